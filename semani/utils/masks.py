"""Pixel masks on token grids: one rule for the editor (VQGAN grid) and the aligner (CLIP grid)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskTooSmallError", "mask_to_token_mask"]


class MaskTooSmallError(ValueError):
    """An entity covers fewer token cells than `min_tokens`; the authors skip such entities."""


def mask_to_token_mask(
    mask: Tensor, grid: tuple[int, int], threshold: float = 0.0, min_tokens: int = 4
) -> Tensor:
    """Pixel mask (H, W) or (B, H, W) in [0, 1] -> token mask (h, w) / (B, h, w) bool.

    Bilinear resize to the token `grid`, then a token belongs to the entity where the value is
    `> threshold`. Raises `MaskTooSmallError` when a mask covers fewer than `min_tokens` cells
    (the authors skip those; pass `min_tokens=0` to keep them).
    """
    if mask.dim() not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])  # (B, 1, H, W)
    m = F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False)  # (B, 1, h, w)
    token_mask = m[:, 0] > threshold  # (B, h, w)
    counts = token_mask.flatten(1).sum(1)  # (B,)
    if bool((counts < min_tokens).any()):
        raise MaskTooSmallError(
            f"entity mask covers {counts.tolist()} token cells, fewer than "
            f"min_tokens={min_tokens}; skip this entity (as the authors do) or pass "
            "min_tokens=0 to edit it anyway"
        )
    return token_mask if mask.dim() == 3 else token_mask[0]
