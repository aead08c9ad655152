"""The four metrics of Table I behind one object sharing one CLIP (`configs/metrics/*.yaml`).

    metrics = hydra.utils.instantiate(cfg.metrics)(caption_pool=test_captions)  # _partial_
    for batch in loader:  # manipulated with a target text
        metrics.update(edited, target_texts, index=batch["index"])
    for batch in loader:  # manipulated with the image's own caption
        metrics.update_l2(batch["image"], edited_own, index=batch["index"])
    metrics.update_seam(batch["image"], edited, masks, index=batch["index"])  # not the paper's
    metrics.compute()  # {"is_mean", "is_std", "clip_score", "r1", "r5", "r10", "l2", "seam",
                       #  "seam_input"}

Each metric is a torchmetrics `Metric`: under DDP every process updates with its own images and
`compute` gathers them (the same numbers on 1 or N processes when `index` is passed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from semani.metrics.clip_metrics import ClipRecall, ClipScore, load_clip
from semani.metrics.inception_score import InceptionScore
from semani.metrics.l2 import L2Error
from semani.metrics.seam import SeamDifference

__all__ = ["Table1Metrics"]


class Table1Metrics(nn.Module):
    """IS (mean, std), CLIP-score, image->text R@N and the L2 error of Table I, and the seam
    difference across the mask border (`SeamDifference`, not in the paper).

    Args:
        classifier: the IS classifier (images in [-1, 1] -> logits).
        caption_pool: the captions R@N draws its other candidates from.
        clip_model, clip_pretrained: the CLIP of CLIP-score and R@N (`load_clip`).
        is_splits, drop_first_logit, is_shuffle_seed: `InceptionScore` arguments.
        recall_ks, recall_candidates, recall_seed: `ClipRecall` arguments.
    """

    def __init__(
        self,
        classifier: nn.Module,
        caption_pool: Sequence[str],
        clip_model: str = "RN50",
        clip_pretrained: str | os.PathLike | None = None,
        is_splits: int = 10,
        drop_first_logit: bool = False,
        is_shuffle_seed: int | None = None,
        recall_ks: Sequence[int] = (1, 5, 10),
        recall_candidates: int = 100,
        recall_seed: int = 0,
    ) -> None:
        super().__init__()
        clip = load_clip(clip_model, clip_pretrained)
        self.inception_score = InceptionScore(
            classifier, splits=is_splits, drop_first_logit=drop_first_logit,
            shuffle_seed=is_shuffle_seed,
        )  # fmt: skip
        self.clip_score = ClipScore(clip)
        self.recall = ClipRecall(
            clip, caption_pool, ks=recall_ks, n_candidates=recall_candidates, seed=recall_seed
        )
        self.l2 = L2Error()
        self.seam = SeamDifference()

    def update(self, images: Tensor, texts: Sequence[str], index: Tensor) -> None:
        """Images (B, 3, H, W) in [-1, 1] manipulated with `texts`; `index` (B,) their ids."""
        self.inception_score.update(images, index)
        self.clip_score.update(images, texts, index)
        self.recall.update(images, texts, index)

    def update_l2(self, inputs: Tensor, outputs: Tensor, index: Tensor | None = None) -> None:
        """Inputs and their manipulation with their own caption, (B, 3, H, W) in [-1, 1]."""
        self.l2.update(inputs, outputs, index)

    def update_seam(
        self, inputs: Tensor, outputs: Tensor, masks: Tensor, index: Tensor | None = None
    ) -> None:
        """Inputs, their target edits (B, 3, H, W) in [-1, 1] and the edited masks (B, H, W)."""
        self.seam.update(inputs, outputs, masks, index)

    def compute(self) -> dict[str, float]:
        """The metrics that were updated, as floats (R@N in percent)."""
        out: dict[str, float] = {}
        if self.inception_score.update_count:
            mean, std = self.inception_score.compute()
            out.update(is_mean=float(mean), is_std=float(std))
        if self.clip_score.update_count:
            out["clip_score"] = float(self.clip_score.compute())
        if self.recall.update_count:
            out.update({k: float(v) for k, v in self.recall.compute().items()})
        if self.l2.update_count:
            out["l2"] = float(self.l2.compute())
        if self.seam.update_count:
            seam, seam_input = (float(v) for v in self.seam.compute())
            if not math.isnan(seam):  # some edit had a mask (predictions elsewhere: none)
                out.update(seam=seam, seam_input=seam_input)
        return out

    def reset(self) -> None:
        for m in (self.inception_score, self.clip_score, self.recall, self.l2, self.seam):
            m.reset()
