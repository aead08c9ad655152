"""The alignment study: how often does a (segmenter, scorer) pair pick the entity a word names?

For every image of a data set with ground-truth entities (ShapesWorld; COCO with instances) and
every entity name ``w`` present in it (a *case*), each segmenter proposes masks once, and each
scorer scores every proposal for the prompt. The prompt is the name itself (``prompt="name"``,
what a user types: "circle") or, where the data set describes its entities, the entity's
description (``prompt="description"``: "small red circle"). The chosen proposal is the scorer's
best (argmax; proposals it cannot score are not eligible). Per case:

- ``correct``: the chosen mask has IoU >= ``iou_threshold`` (0.5) with a ground-truth entity
  named ``w`` (with ground-truth proposals: the chosen one *is* such an entity);
- ``iou``: the best IoU of the chosen mask with an entity named ``w`` (0 when none is chosen);
- ``chance_correct`` / ``chance_iou``: the same expected under a uniform random choice among
  the eligible proposals (the baseline every scorer must beat);
- ``oracle_correct``: some proposal is correct (the segmenter's ceiling for any scorer).

`run_study` returns one record per (segmenter, scorer, prompt kind, case); `summarize` averages
them into table rows (also per word), `markdown_table` renders them.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from semani.alignment.scorers import EntityScorer, as_image
from semani.alignment.segmenters.common import mask_iou
from semani.alignment.types import EntityProposals

log = logging.getLogger(__name__)

__all__ = ["CaseRecord", "PROMPT_KINDS", "markdown_table", "run_study", "summarize"]

PROMPT_KINDS = ("name", "description")


@dataclass
class CaseRecord:
    """One (segmenter, scorer, prompt kind, image, word) case (see the module docstring)."""

    segmenter: str
    scorer: str
    prompt_kind: str
    image: int
    word: str
    prompt: str
    n_proposals: int
    n_eligible: int
    correct: float
    iou: float
    chance_correct: float
    chance_iou: float
    oracle_correct: float
    seconds: float


def _cases(sample: Mapping[str, Any], descriptions: Sequence[str] | None, kind: str):
    """(word, prompt, ground-truth masks (G, H, W) bool) per distinct entity name."""
    names: list[str] = list(sample["entity_names"])
    masks: Tensor = sample["entity_masks"] > 0.5  # (K, H, W)
    for word in dict.fromkeys(names):  # each name once, in order
        idx = [k for k, n in enumerate(names) if n == word and bool(masks[k].any())]
        if not idx:
            continue
        if kind == "description":
            if descriptions is None or len(idx) > 1:  # a description names one entity
                continue
            prompt = descriptions[idx[0]]
        else:
            prompt = word
        yield word, prompt, masks[idx]


def _text_conditioned(segment: Callable[..., EntityProposals]) -> bool:
    """Whether `segment` (a segmenter's bound ``segment``, or a function) reads the prompt."""
    owner = getattr(segment, "__self__", segment)
    return bool(getattr(owner, "text_conditioned", False))


def run_study(
    dataset: Sequence[Mapping[str, Any]],
    segmenters: Mapping[str, Callable[[Tensor, Mapping[str, Any]], EntityProposals]],
    scorers: Mapping[str, EntityScorer],
    prompt_kinds: Sequence[str] = ("name",),
    max_images: int | None = None,
    iou_threshold: float = 0.5,
    describe: Callable[[int], Sequence[str]] | None = None,
    min_candidates: int = 1,
    progress_every: int = 50,
) -> list[CaseRecord]:
    """Every case of `dataset` through every segmenter x scorer (see the module docstring).

    Args:
        dataset: samples with ``image`` (3, H, W) in [-1, 1], ``entity_masks``, ``entity_names``.
        segmenters: name -> fn(image, sample) -> proposals at the image's size; a
            text-conditioned segmenter's (``text_conditioned = True``, e.g. GroundingDINO + SAM)
            is called once per case as fn(image, sample, word=prompt), and `min_candidates`
            then applies per case.
        scorers: name -> scorer (image, proposals, prompt) -> (K,) (NaN: not scored).
        prompt_kinds: "name" and/or "description" (needs `describe`).
        max_images: the first N images (None: all).
        describe: fn(i) -> image i's entity descriptions, in ``entity_names`` order.
        min_candidates: leave out images where a segmenter gives fewer proposals (with one
            proposal every scorer is right: it says nothing about scoring).
    """
    unknown = sorted(set(prompt_kinds) - set(PROMPT_KINDS))
    if unknown:
        raise ValueError(f"unknown prompt kinds {unknown}; use {PROMPT_KINDS}")
    if "description" in prompt_kinds and describe is None:
        raise ValueError("prompt kind 'description' needs a data set with entity descriptions")
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    records: list[CaseRecord] = []
    for i in range(n):
        sample = dataset[i]
        image = as_image(sample["image"])
        descriptions = describe(sample["index"]) if describe is not None else None
        for seg_name, segment in segmenters.items():
            per_prompt = _text_conditioned(segment)
            if not per_prompt:
                proposals = segment(image, sample)
                K = len(proposals)
                if K < min_candidates:
                    continue
            for kind in prompt_kinds:
                for word, prompt, gt in _cases(sample, descriptions, kind):
                    if per_prompt:  # proposals for this prompt
                        proposals = segment(image, sample, word=prompt)
                        K = len(proposals)
                        if K < min_candidates:
                            continue
                    iou = (
                        mask_iou(proposals.masks, gt).amax(1) if K else torch.zeros(0)
                    )  # (K,) each proposal's best IoU with an entity named `word`
                    ok = (iou >= iou_threshold).float()
                    for sc_name, scorer in scorers.items():
                        t0 = time.perf_counter()
                        scores = scorer(image, proposals, prompt).float() if K else torch.zeros(0)
                        seconds = time.perf_counter() - t0
                        eligible = ~torch.isnan(scores)
                        m = int(eligible.sum())
                        if m:
                            best = int(torch.where(eligible, scores, -math.inf).argmax())
                            correct, chosen_iou = float(ok[best]), float(iou[best])
                            chance_c = float(ok[eligible].mean())
                            chance_i = float(iou[eligible].mean())
                        else:
                            correct = chosen_iou = chance_c = chance_i = 0.0
                        records.append(CaseRecord(
                            seg_name, sc_name, kind, int(sample["index"]), word, prompt, K, m,
                            correct, chosen_iou, chance_c, chance_i,
                            float(ok.max()) if K else 0.0, seconds,
                        ))  # fmt: skip
        if progress_every and (i + 1) % progress_every == 0:
            log.info("alignment study: %d / %d images", i + 1, n)
    return records


_MEANS = ("correct", "iou", "chance_correct", "chance_iou", "oracle_correct", "seconds")


def summarize(records: Iterable[CaseRecord], by_word: bool = False) -> list[dict[str, Any]]:
    """Mean of each measure per (segmenter, scorer, prompt kind[, word]); ``cases`` counts them
    and ``unscorable`` those where the scorer could score no proposal."""
    groups: dict[tuple, list[CaseRecord]] = defaultdict(list)
    for r in records:
        key = (r.segmenter, r.scorer, r.prompt_kind) + ((r.word,) if by_word else ())
        groups[key].append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(("segmenter", "scorer", "prompt_kind", "word"), key))
        row["cases"] = len(rs)
        for m in _MEANS:
            row[m] = sum(getattr(r, m) for r in rs) / len(rs)
        row["unscorable"] = sum(r.n_eligible == 0 for r in rs)
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` (floats with 3 decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def records_as_dicts(records: Iterable[CaseRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
