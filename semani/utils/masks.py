"""Pixel masks: on token grids (one rule for the editor's VQGAN grid and the aligner's CLIP grid),
and masked entity crops (OVSeg's, for the mask-prompt CLIP and the entity-crop data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MaskTooSmallError", "mask_to_token_mask", "masked_crops"]


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


def masked_crops(
    images: Tensor,
    masks: Tensor,
    size: tuple[int, int],
    fill: Tensor,
    square: bool = False,
    full: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Entity crops: bounding box of each mask, background = `fill`, resized to `size`.

    Args:
        images: (3, H, W) one image, or (K, 3, H, W) one per mask, in [-1, 1].
        masks: (K, H, W) bool.
        size: (h, w) of the crops (the CLIP input size).
        fill: (3,) the background colour in the images' range (CLIP's mean colour: 2 * mean - 1).
        square: pad each box to a square (centred, with `fill`) before resizing.
        full: the whole image instead of the box (the paper's masked image: the input's shape,
            every non-entity pixel `fill`).

    Returns:
        crops (K, 3, h, w), crop masks (K, h, w) float in {0, 1} (nearest), valid (K,) bool
        (False for an empty mask: its crop is all `fill` and its mask all 0).
    """
    K, (H, W) = masks.shape[0], masks.shape[-2:]
    if images.dim() == 3:
        images = images[None].expand(K, -1, -1, -1)
    if images.shape[0] != K or images.shape[-2:] != (H, W):
        raise ValueError(f"images {tuple(images.shape)} do not fit masks {tuple(masks.shape)}")
    fill = fill.to(images).view(3, 1, 1)
    crops = fill.expand(K, 3, *size).clone()  # (K, 3, h, w)
    crop_masks = images.new_zeros(K, *size)  # (K, h, w)
    rows, cols = masks.any(2), masks.any(1)  # (K, H), (K, W)
    valid = rows.any(1)  # (K,)
    if full:  # every box is the whole image
        rows, cols = rows | valid[:, None], cols | valid[:, None]
    top = rows.float().argmax(1).tolist()
    bottom = (H - rows.flip(1).float().argmax(1)).tolist()  # exclusive
    left = cols.float().argmax(1).tolist()
    right = (W - cols.flip(1).float().argmax(1)).tolist()
    for k in torch.nonzero(valid).flatten().tolist():
        m = masks[k, top[k] : bottom[k], left[k] : right[k]].to(images.dtype)  # (bh, bw)
        x = images[k, :, top[k] : bottom[k], left[k] : right[k]]  # (3, bh, bw)
        x = x * m + fill * (1 - m)
        if square:
            bh, bw = m.shape
            dh, dw = max(bw - bh, 0), max(bh - bw, 0)
            pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
            x = F.pad(x - fill, pad) + fill  # pad with the fill colour
            m = F.pad(m, pad)
        crops[k] = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0]
        crop_masks[k] = F.interpolate(m[None, None], size=size, mode="nearest")[0, 0]
    return crops, crop_masks, valid
