"""The data the alignment phase passes around: proposals in, a chosen entity out.

segmenter: image -> `EntityProposals` (K class-agnostic boolean masks at the image's own size);
scorer: (image, proposals, word) -> K similarities; selection -> `AlignmentResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["AlignmentResult", "EntityNotFoundError", "EntityProposals"]


@dataclass
class EntityProposals:
    """K class-agnostic entity masks of one image.

    masks: (K, H, W) bool at the image's own size (H, W); K may be 0.
    scores: (K,) float, the segmenter's confidence (1.0 where it has none), in descending order.
    names: optional K labels (ground-truth proposals know them; learned segmenters do not).
    """

    masks: Tensor
    scores: Tensor
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.masks.dim() != 3:
            raise ValueError(f"masks must be (K, H, W), got {tuple(self.masks.shape)}")
        if self.masks.dtype != torch.bool:
            raise ValueError(f"masks must be bool, got {self.masks.dtype}")
        if self.scores.shape != (self.masks.shape[0],):
            raise ValueError(
                f"scores must be ({self.masks.shape[0]},), got {tuple(self.scores.shape)}"
            )
        if self.names is not None and len(self.names) != self.masks.shape[0]:
            raise ValueError(f"{len(self.names)} names for {self.masks.shape[0]} masks")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image the masks belong to."""
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    def sorted(self) -> EntityProposals:
        """The same proposals in descending score order (stable)."""
        order = torch.argsort(self.scores, descending=True, stable=True)
        names = [self.names[i] for i in order.tolist()] if self.names is not None else None
        return EntityProposals(self.masks[order], self.scores[order], names)


@dataclass
class AlignmentResult:
    """The entity (or entities) chosen for one prompt word.

    word: the prompt word.
    mask: (H, W) bool, the union of the chosen proposals' masks.
    chosen: indices into `proposals` of the chosen ones (the best first).
    similarities: (K,) the scorer's similarity of every proposal to the word (NaN = not scored,
        e.g. too small for the token grid).
    proposals: every proposal the segmenter gave.
    token_mask: (h, w) bool on an editor's token grid, when the aligner was given one.
    """

    word: str
    mask: Tensor
    chosen: list[int]
    similarities: Tensor
    proposals: EntityProposals
    token_mask: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def ranking(self) -> list[tuple[int, float]]:
        """(proposal index, similarity), best first, NaNs last."""
        sims = self.similarities.tolist()
        return sorted(enumerate(sims), key=lambda t: (t[1] != t[1], -t[1] if t[1] == t[1] else 0))


class EntityNotFoundError(LookupError):
    """No proposal matches the prompt word. Carries every proposal's similarity, best first,
    and the proposals themselves when there were any (to show them)."""

    def __init__(
        self,
        word: str,
        ranking: list[tuple[int, float]],
        reason: str,
        proposals: EntityProposals | None = None,
    ) -> None:
        self.word, self.ranking, self.proposals = word, ranking, proposals
        best = ", ".join(f"#{i}: {s:.3f}" for i, s in ranking[:5]) or "no proposals"
        super().__init__(f"no entity matches {word!r}: {reason} (best proposals: {best})")
