"""`python eval.py protocol=alignment data=<data>`: the alignment study as a task.

Builds the data module's test split, every segmenter of ``study.segmenters`` and every scorer of
``study.scorers`` (name -> `_target_` config; an entry that is null, or whose ``enabled`` is
null/false, is skipped: the tuned mask prompt's entry is enabled by ``study.mask_prompt``), runs
`semani.alignment.study.run_study`, and writes into the run's output folder:

- ``alignment_study.md``: the summary table (and the per-word one) in Markdown;
- ``alignment_study.csv``: one row per (segmenter, scorer, prompt kind);
- ``alignment_study_per_word.csv``: the same per prompt word;
- ``alignment_cases.csv``: every case.

Each file is written to a temporary name and renamed (`semani.utils.atomic`), so a crash leaves
no half-written table.
Returns ``{"<segmenter>/<scorer>/<prompt>/accuracy": ..., ".../miou": ..., ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from semani.alignment.study import markdown_table, records_as_dicts, run_study, summarize
from semani.utils.atomic import write_csv, write_text
from semani.utils.errors import one_line_errors
from semani.utils.instantiators import instantiate_unwrapped
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import exit_on_sigterm

log = get_pylogger(__name__)

__all__ = ["alignment_study", "main"]

SUMMARY_COLUMNS = (
    *("segmenter", "scorer", "prompt_kind", "cases", "correct", "iou", "chance_correct"),
    *("chance_iou", "oracle_correct", "unscorable", "seconds"),
)
WORD_COLUMNS = (
    *("segmenter", "scorer", "prompt_kind", "word", "cases", "correct", "iou", "chance_correct"),
)
HEADERS = {"correct": "accuracy", "iou": "mIoU", "chance_correct": "chance acc.",
           "chance_iou": "chance mIoU", "oracle_correct": "oracle acc.",
           "seconds": "s / case"}  # fmt: skip


def _enabled(entries: Mapping[str, Any] | None) -> dict[str, DictConfig]:
    out = {}
    for name, cfg in (entries or {}).items():
        if cfg is None:
            continue
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        if "enabled" in cfg:
            if not cfg.pop("enabled"):
                log.info("alignment study: %s skipped (not enabled)", name)
                continue
        out[str(name)] = cfg
    return out


def _build(group: str, name: str, cfg: DictConfig) -> Any:
    log.info("alignment study: %s %s (%s)", group[:-1], name, cfg.get("_target_"))
    try:
        return instantiate_unwrapped(cfg)
    except Exception as err:
        raise type(err)(
            f"alignment study {group[:-1]} {name!r}: {err} (leave it out with "
            f"study.{group}.{name}=null)"
        ) from err


def _renamed(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{HEADERS.get(k, k): v for k, v in r.items()} for r in rows]


def alignment_study(cfg: DictConfig) -> dict[str, float]:
    """Run the study of ``cfg.study`` on ``cfg.data``'s test split (see the module docstring)."""
    study = cfg.study
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)  # untrained scorers are seeded
    datamodule = instantiate_unwrapped(cfg.data)
    datamodule.setup("test")
    dataset = datamodule.data_test
    describe = getattr(dataset, "entity_descriptions", None)

    segmenters = {
        name: _build("segmenters", name, c).segment
        for name, c in _enabled(study.segmenters).items()
    }
    scorers = {name: _build("scorers", name, c) for name, c in _enabled(study.scorers).items()}
    if not segmenters or not scorers:
        raise ValueError("study.segmenters and study.scorers must each enable at least one entry")

    with torch.inference_mode():
        records = run_study(
            dataset,
            segmenters,
            scorers,
            prompt_kinds=list(study.prompt_kinds),
            max_images=study.get("max_images"),
            iou_threshold=float(study.get("iou_threshold", 0.5)),
            describe=describe,
            min_candidates=int(study.get("min_candidates", 1)),
        )
    rows, per_word = summarize(records), summarize(records, by_word=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_images = len({r.image for r in records})
    text = (
        f"# Alignment study: {cfg.data.dataset}, {n_images} test images\n\n"
        "accuracy: the chosen proposal has IoU >= "
        f"{study.get('iou_threshold', 0.5)} with an entity the prompt names; chance: a uniform "
        "choice among the proposals the scorer could score; oracle: some proposal is right. "
        f"Images with fewer than {study.get('min_candidates', 1)} proposals are left out.\n\n"
        + markdown_table(_renamed(rows), [HEADERS.get(c, c) for c in SUMMARY_COLUMNS])
        + "\n\n## Per prompt word\n\n"
        + markdown_table(_renamed(per_word), [HEADERS.get(c, c) for c in WORD_COLUMNS])
        + "\n"
    )
    write_text(out / "alignment_study.md", text)
    write_csv(out / "alignment_study.csv", rows, SUMMARY_COLUMNS)
    write_csv(out / "alignment_study_per_word.csv", per_word, WORD_COLUMNS)
    cases = records_as_dicts(records)
    write_csv(out / "alignment_cases.csv", cases, list(cases[0]) if cases else ["image"])
    log.info("alignment study written to %s\n%s", out / "alignment_study.md", text)
    metrics = {}
    for r in rows:
        key = f"{r['segmenter']}/{r['scorer']}/{r['prompt_kind']}"
        metrics[f"{key}/accuracy"] = float(r["correct"])
        metrics[f"{key}/miou"] = float(r["iou"])
        metrics[f"{key}/chance"] = float(r["chance_correct"])
    return metrics


@one_line_errors()
def main(cfg: DictConfig) -> dict[str, float]:
    """`alignment_study(cfg)`; the failures a user can fix (a missing file, a bad option) exit
    with one line."""
    exit_on_sigterm()
    return alignment_study(cfg)
