"""The semantic alignment phase: segment -> score -> select (paper Eq. 1 and SeMani-Trans's rule).

`EntityAligner(scorer, segmenter)` finds the entity a prompt word names:

- **segment**: `segmenter.segment(image, sample) -> EntityProposals` (or proposals passed in
  directly; `sample` is the data set sample the image comes from, for oracle proposals);
  with `max_proposals`, only the segmenter's best ones are scored (the authors score 5), the
  others get NaN;
- **score**: the scorer gives every proposal a similarity to the word (NaN: not scored);
- **select**: among the eligible proposals (scored, big enough for the editor's token grid when
  one is given, not taken by an earlier request for the same word), in descending similarity:
  `selection="argmax"` takes the best (Eq. 1); `"threshold"` takes the best **always** and then
  every further one whose similarity is `>= threshold` (the authors' SeMani-Trans rule,
  0.163 with FILIP-large). `threshold_mode="strict"` also requires the best to reach the
  threshold. `pick` chooses the instance instead of the rule: `"all"` takes every eligible
  proposal at or above the threshold (none: not found), `k` the k-th best eligible one, `"#i"`
  proposal i of the segmenter's list (the user's choice: no threshold applies); `"best"`
  (default) leaves the rule.

The result's `mask` is the union of the chosen masks; with `token_grid=(h, w)` also
`token_mask`, the union on that grid (`mask_to_token_mask`: bilinear, > 0).

**No match** raises `EntityNotFoundError` (never an empty mask), which lists the best proposals
and their similarities and carries every proposal, when: the segmenter proposed nothing; no
proposal could be scored (all too small for the scorer: NaN); every scored proposal covers
fewer than `min_tokens` cells of the given token grid; every eligible one was taken by earlier
requests for the same word; or, with `threshold_mode="strict"`, none reaches the threshold.

**Several entities** (`align_many`): `"bird: a blue bird | branch: a snowy branch"` is parsed by
`parse_entity_edits` into (word, text) pairs, aligned in order on the same image (the editor then
edits them in turn, each edit starting from the previous one's tokens). As the authors do, a
word that is asked for again later takes only its best proposal, and (our reading of the rule)
proposals taken for a word are not offered to that word's later requests, so
`"bird: a red bird | bird: a blue bird"` names two different birds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from semani.alignment.cache import AlignmentCache, fingerprint
from semani.alignment.scorers import EntityScorer, as_image
from semani.alignment.types import AlignmentResult, EntityNotFoundError, EntityProposals
from semani.utils.masks import mask_to_token_mask

log = logging.getLogger(__name__)

__all__ = ["EntityAligner", "EntityEdit", "parse_entity_edits"]

SELECTIONS = ("threshold", "argmax")
THRESHOLD_MODES = ("keep_best", "strict")


def check_pick(pick: str | int) -> str | int:
    """`pick` as the aligner takes it: "best" (the selection rule), "all" (every eligible
    proposal at or above the threshold), k >= 1 (the k-th best eligible proposal; "2" too) or
    "#i" (proposal i of the segmenter's list, as the app's table numbers them)."""
    if isinstance(pick, str) and pick.strip().isdigit():
        pick = int(pick)
    if isinstance(pick, str) and pick.strip().startswith("#") and pick.strip()[1:].isdigit():
        return f"#{int(pick.strip()[1:])}"
    ok = pick in ("best", "all") or (isinstance(pick, int) and not isinstance(pick, bool))
    if not ok or (isinstance(pick, int) and pick < 1):
        raise ValueError(
            "pick must be 'best', 'all', a rank k >= 1 (the k-th best proposal) or '#i' "
            f"(proposal i), got {pick!r}"
        )
    return pick


class EntityEdit(NamedTuple):
    """One entity of a multi-entity edit: the word that names it, its new text, its alignment."""

    word: str
    text: str
    result: AlignmentResult


def parse_entity_edits(spec: str) -> list[tuple[str, str]]:
    """`"bird: a blue bird | branch: a snowy branch"` -> [("bird", "a blue bird"), ...].

    Parts are split on "|", each on its first ":"; whitespace is stripped. Raises ValueError
    naming the part that has no ":" or an empty word or text.
    """
    pairs = []
    for part in spec.split("|"):
        word, sep, text = part.partition(":")
        word, text = word.strip(), text.strip()
        if not sep or not word or not text:
            raise ValueError(
                f"cannot parse {part.strip()!r} in {spec!r}: each entity edit is "
                "'word: description', several separated by '|' "
                "(e.g. 'bird: a blue bird | branch: a snowy branch')"
            )
        pairs.append((word, text))
    return pairs


class EntityAligner(nn.Module):
    """Segmenter + scorer + selection -> `AlignmentResult` (see the module docstring).

    Args:
        scorer: (image, proposals, word) -> (K,) similarities, with `selection` and `threshold`
            attributes (`TokenWiseScorer`, `MaskPromptScorer`, `MaskedCropClipScorer`).
        segmenter: anything with `segment(image, sample=None) -> EntityProposals`
            (`semani.alignment.segmenters.Segmenter`); None if proposals are always passed.
        selection: "threshold" or "argmax"; None: the scorer's own.
        threshold: None: the scorer's.
        threshold_mode: "keep_best" (the best is taken even below the threshold, as the
            authors) or "strict" (no proposal reaching the threshold -> EntityNotFoundError).
        min_tokens: a proposal covering fewer cells of the editor's token grid is not eligible
            (the authors' 4); only used when `align` is given a `token_grid`.
        max_proposals: score only the segmenter's best N proposals (the authors: 5); None: all.
        pick: "best" (the rule above), "all" (every eligible proposal at or above the
            threshold), k >= 1 (the k-th best eligible proposal, whatever its score) or "#i"
            (proposal i, e.g. the one clicked in the app).
        cache: keep the proposals and the scorer's image features of the last `cache` images
            (`semani.alignment.cache`): a second edit of an image skips the segmenter and the
            image tower; 0: none.
    """

    def __init__(
        self,
        scorer: EntityScorer,
        segmenter: Any = None,
        selection: str | None = None,
        threshold: float | None = None,
        threshold_mode: str = "keep_best",
        min_tokens: int = 4,
        max_proposals: int | None = None,
        pick: str | int = "best",
        cache: int = 0,
    ) -> None:
        super().__init__()
        self.pick = check_pick(pick)
        self.cache = AlignmentCache(cache) if cache else None
        self.scorer = scorer
        self.segmenter = segmenter
        self.selection = selection or getattr(scorer, "selection", "argmax")
        self.threshold = threshold if threshold is not None else getattr(scorer, "threshold", None)
        self.threshold_mode = threshold_mode
        self.min_tokens = int(min_tokens)
        self.max_proposals = max_proposals
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(
                f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}"
            )
        if self.threshold is None and (
            self.selection == "threshold" or threshold_mode == "strict" or self.pick == "all"
        ):
            raise ValueError(
                f"selection={self.selection!r} with threshold_mode={threshold_mode!r} and "
                f"pick={self.pick!r} needs a threshold, and neither the aligner nor "
                f"{type(scorer).__name__} has one: pass threshold="
            )

    # ---------------------------------------------------------------- steps

    @classmethod
    def from_config(cls, cfg: Any) -> EntityAligner:
        """An aligner from the `alignment` config group (`configs/alignment/`): its `scorer`
        and `segmenter` nodes are built first (their constructors' own errors, e.g. missing
        weights), the other keys are this class's arguments."""
        from omegaconf import OmegaConf

        from semani.utils.instantiators import instantiate_unwrapped

        args = {k: v for k, v in cfg.items() if k not in ("_target_", "scorer", "segmenter")}
        args = OmegaConf.to_container(OmegaConf.create(args), resolve=True)
        segmenter = None
        if cfg.get("segmenter"):
            segmenter = instantiate_unwrapped(cfg.segmenter, _convert_="all")
        return cls(instantiate_unwrapped(cfg.scorer), segmenter, **args)

    def propose(
        self, image: Tensor, sample: Mapping[str, Any] | None = None, word: str | None = None
    ) -> EntityProposals:
        """The segmenter's proposals for `image` (`sample`: the data set sample it comes from,
        for the ground-truth segmenter). `word` reaches only a text-conditioned segmenter (one
        with `text_conditioned = True`, e.g. GroundingDINO + SAM) as `segment(..., word=word)`;
        the others are called `segment(image, sample)`."""
        return self._propose(image, sample, word, self._digest(image))

    def _digest(self, image: Tensor) -> str | None:
        return fingerprint(image) if self.cache is not None else None

    def _propose(
        self, image: Tensor, sample: Mapping[str, Any] | None, word: str | None, digest: str | None
    ) -> EntityProposals:
        if self.segmenter is None:
            raise ValueError("this aligner has no segmenter: pass proposals= to align()")
        per_word = getattr(self.segmenter, "text_conditioned", False)
        if word is not None and per_word:

            def make():
                return self.segmenter.segment(image, sample, word=word)
        else:

            def make():
                return self.segmenter.segment(image, sample)

        if digest is None or sample is not None:
            return make()
        return self.cache.get(digest, ("proposals", word if per_word else None), make)

    def score(self, image: Tensor, proposals: EntityProposals, word: str) -> Tensor:
        """(K,) float similarities on the CPU; NaN where not scored (or beyond max_proposals)."""
        return self._score(image, proposals, word, self._digest(image))

    def _score(
        self, image: Tensor, proposals: EntityProposals, word: str, digest: str | None
    ) -> Tensor:
        K = len(proposals)
        keep = torch.arange(K)
        if self.max_proposals is not None and K > self.max_proposals:
            keep = torch.argsort(proposals.scores, descending=True, stable=True)
            keep = keep[: self.max_proposals].sort().values
        sims = torch.full((K,), float("nan"))
        if len(keep):
            sub = proposals if len(keep) == K else _subset(proposals, keep)
            if digest is not None and hasattr(self.scorer, "encode"):
                features = self.cache.get(
                    digest,
                    ("features", fingerprint(sub.masks)),
                    lambda: self.scorer.encode(image, sub),
                )
                sims[keep] = self.scorer.compare(features, word).float().cpu()
            else:
                sims[keep] = self.scorer(image, sub, word).float().cpu()
        return sims

    def select(
        self,
        word: str,
        sims: Tensor,
        proposals: EntityProposals,
        token_grid: tuple[int, int] | None = None,
        taken: Sequence[int] = (),
        best_only: bool = False,
    ) -> AlignmentResult:
        """The selection rule on given similarities (see the module docstring)."""
        K = len(proposals)
        ranking = AlignmentResult(
            word, proposals.masks.new_zeros(proposals.size), [], sims, proposals
        ).ranking()
        scored = ~torch.isnan(sims)
        big = torch.ones(K, dtype=torch.bool)
        token_masks = None
        if token_grid is not None and K:
            token_masks = mask_to_token_mask(proposals.masks, token_grid, min_tokens=0)
            big = token_masks.flatten(1).sum(1).cpu() >= self.min_tokens
        free = torch.ones(K, dtype=torch.bool)
        free[list(taken)] = False
        eligible = scored & big & free

        def not_found(reason: str) -> EntityNotFoundError:
            return EntityNotFoundError(word, ranking, reason, proposals)

        if K == 0:
            raise not_found("the segmenter proposed no entities")
        if not scored.any():
            raise not_found(
                f"none of the {K} proposals could be scored (all too small for the scorer)"
            )
        if not (scored & big).any():
            raise not_found(
                f"every scored proposal covers fewer than {self.min_tokens} cells of the "
                f"{tuple(token_grid)} token grid"
            )
        if not eligible.any():
            raise not_found(
                f"every eligible proposal was taken by an earlier request for {word!r}"
            )
        idx = torch.nonzero(eligible).flatten()
        order = idx[torch.argsort(sims[idx], descending=True, stable=True)].tolist()
        best = order[0]
        thr = self.threshold
        if isinstance(self.pick, str) and self.pick.startswith("#") and not best_only:
            i = int(self.pick[1:])  # the proposal the user clicked: no threshold
            if i >= K or not eligible[i]:
                why = "there are only {K}" if i >= K else "it is too small or already taken"
                raise not_found(f"pick={self.pick!r} names proposal {i}, and " + why.format(K=K))
            chosen = [i]
        elif isinstance(self.pick, int) and not best_only:  # the user's choice: no threshold
            if self.pick > len(order):
                raise not_found(
                    f"pick={self.pick} asks for the {self.pick}th best proposal, and only "
                    f"{len(order)} are eligible"
                )
            chosen = [order[self.pick - 1]]
        elif self.pick == "all" and not best_only:
            chosen = [i for i in order if float(sims[i]) >= thr]
            if not chosen:
                raise not_found(f"no proposal reaches the threshold {thr} (pick='all')")
        else:
            if self.threshold_mode == "strict" and float(sims[best]) < thr:
                raise not_found(
                    f"no proposal reaches the threshold {thr} (threshold_mode='strict'; to "
                    "edit the best one anyway pick it: select=1, or lower the threshold)"
                )
            chosen = [best]
            if self.selection == "threshold" and not best_only:
                chosen += [i for i in order[1:] if float(sims[i]) >= thr]
        mask = proposals.masks[chosen].any(dim=0)  # (H, W)
        token_mask = token_masks[chosen].any(dim=0) if token_masks is not None else None
        extras = {
            "eligible": eligible,
            "pick": self.pick,
            "selection": self.selection,
            "threshold": thr,
            "threshold_mode": self.threshold_mode,
        }
        return AlignmentResult(word, mask, chosen, sims, proposals, token_mask, extras)

    # ---------------------------------------------------------------- API

    def align(
        self,
        image: Tensor,
        word: str,
        token_grid: tuple[int, int] | None = None,
        proposals: EntityProposals | None = None,
        sample: Mapping[str, Any] | None = None,
    ) -> AlignmentResult:
        """Find the entity `word` names in `image` ((3, H, W) in [-1, 1]).

        Args:
            token_grid: the editor's token grid (e.g. (16, 16)): also return the token mask, and
                make proposals under `min_tokens` cells on it ineligible.
            proposals: use these instead of calling the segmenter.
            sample: the data set sample `image` comes from (passed to the segmenter).

        A text-conditioned segmenter is also given `word` (see `propose`).

        Raises:
            EntityNotFoundError: no proposal matches (see the module docstring).
        """
        image = as_image(image)
        digest = self._digest(image)  # hashed once per call
        if proposals is None:
            proposals = self._propose(image, sample, word, digest)
        as_image(image, proposals)  # masks at the image's size
        sims = self._score(image, proposals, word, digest)
        return self.select(word, sims, proposals, token_grid)

    forward = align

    def align_many(
        self,
        image: Tensor,
        edits: str | Sequence[tuple[str, str]],
        token_grid: tuple[int, int] | None = None,
        proposals: EntityProposals | None = None,
        sample: Mapping[str, Any] | None = None,
    ) -> list[EntityEdit]:
        """Align every entity of a multi-entity edit on the same image, in order.

        `edits` is "word: text | word: text" or a list of (word, text). The image is segmented
        once (a text-conditioned segmenter: once per distinct word, each word keeping its own
        proposals) and scored once per distinct word; a word asked for again later takes only
        its best proposal, and proposals taken for a word are not offered to its later requests.
        """
        pairs = parse_entity_edits(edits) if isinstance(edits, str) else list(edits)
        image = as_image(image)
        digest = self._digest(image)  # hashed once per call
        per_word = proposals is None and getattr(self.segmenter, "text_conditioned", False)
        if not per_word:
            if proposals is None:
                proposals = self._propose(image, sample, None, digest)
            as_image(image, proposals)
        word_proposals: dict[str, EntityProposals] = {}
        sims: dict[str, Tensor] = {}
        taken: dict[str, list[int]] = {}
        out = []
        for i, (word, text) in enumerate(pairs):
            if word not in sims:
                if per_word:
                    proposals = self._propose(image, sample, word, digest)
                    as_image(image, proposals)
                word_proposals[word] = proposals
                sims[word] = self._score(image, proposals, word, digest)
            again = any(w == word for w, _ in pairs[i + 1 :])
            result = self.select(
                word,
                sims[word],
                word_proposals[word],
                token_grid,
                taken.get(word, ()),
                best_only=again,
            )
            taken.setdefault(word, []).extend(result.chosen)
            out.append(EntityEdit(word, text, result))
        return out


def _subset(proposals: EntityProposals, index: Tensor) -> EntityProposals:
    names = [proposals.names[i] for i in index.tolist()] if proposals.names is not None else None
    return EntityProposals(proposals.masks[index], proposals.scores[index], names)
