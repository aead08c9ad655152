"""What every entity segmenter shares: the interface, image conversion and post-processing.

A segmenter is any object with ``segment(image, **kwargs) -> EntityProposals``; ``image`` is a
(3, H, W) float tensor in [-1, 1] (the data sets' convention) or a PIL image, and the proposals
are K class-agnostic boolean masks at (H, W), sorted by descending score.

Post-processing rules (``finalize_proposals`` applies them in this order):

1. masks are resized to the image's own size (nearest for bool masks, bilinear + threshold for
   soft ones) and binarised;
2. masks smaller than ``min_area_frac`` of the image (and empty ones) are dropped;
3. proposals are sorted by descending score (stable: ties keep the segmenter's order);
4. at most ``max_proposals`` are kept (the authors keep 5 EntitySeg proposals).

``suppress_overlaps`` is the mask NMS of the point-prompted SAM segmenter (see its docstring).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from semani.alignment.types import EntityProposals
from semani.data.transforms import to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "ImageLike",
    "Segmenter",
    "finalize_proposals",
    "mask_iou",
    "mask_containment",
    "proposal_recall",
    "resize_masks",
    "suppress_overlaps",
    "to_uint8_image",
]

ImageLike = Tensor | Image.Image | np.ndarray


@runtime_checkable
class Segmenter(Protocol):
    """image -> K class-agnostic entity proposals at the image's own size, best first."""

    def segment(self, image: ImageLike, **kwargs: Any) -> EntityProposals: ...


# -- images ---------------------------------------------------------------------------------------
def to_uint8_image(image: ImageLike) -> Tensor:
    """(3, H, W) uint8 RGB tensor from a [-1, 1] float tensor, a PIL image or an (H, W, 3) array.

    Float tensors are read as the data sets' [-1, 1] convention; uint8 tensors pass through.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a tensor, a PIL image or an array, got {type(image)}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.cpu()
    return to_uint8(image.cpu())


def image_size(image: ImageLike) -> tuple[int, int]:
    """(H, W) of an image in any accepted form."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    return int(image.shape[-2]), int(image.shape[-1])


# -- masks ----------------------------------------------------------------------------------------
def resize_masks(masks: Tensor, size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """(K, h, w) bool or soft masks -> (K, H, W) bool at ``size``.

    Bool masks are resized with nearest-neighbour sampling; float masks (probabilities) bilinearly
    and then thresholded at ``threshold``.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (K, h, w), got {tuple(masks.shape)}")
    size = (int(size[0]), int(size[1]))
    if masks.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=masks.device)
    if masks.dtype == torch.bool:
        if tuple(masks.shape[-2:]) == size:
            return masks
        return F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0] > 0.5
    soft = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        soft = F.interpolate(soft[None], size=size, mode="bilinear", align_corners=False)[0]
    return soft > threshold


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """(Ka, Kb) intersection over union of two stacks of bool masks (Ka, H, W), (Kb, H, W)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()  # (Ka, HW), (Kb, HW)
    inter = a @ b.T  # (Ka, Kb)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def mask_containment(a: Tensor, b: Tensor) -> Tensor:
    """(Ka, Kb) fraction of each mask of ``a`` that lies inside each mask of ``b``."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return (a @ b.T) / a.sum(1)[:, None].clamp(min=1)


def suppress_overlaps(
    masks: Tensor,
    scores: Tensor,
    iou_thresh: float = 0.7,
    containment_thresh: float | None = 0.9,
) -> Tensor:
    """Indices (into ``masks``) of the masks that survive mask NMS, best score first.

    Greedy, in descending score order; a mask is dropped when, against a mask already kept,
      - their mask IoU is > ``iou_thresh`` (a duplicate), or
      - more than ``containment_thresh`` of its pixels lie inside the kept mask AND the kept mask
        is larger (it is a part of an entity already proposed, e.g. a bird's head under the bird).
    A large mask is never dropped for containing a smaller, better-scored one: a part proposed
    first does not hide its whole. ``containment_thresh=None`` turns the second rule off.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True, stable=True)
    m = masks[order].flatten(1).float()  # (K, HW)
    area = m.sum(1)  # (K,)
    inter = m @ m.T  # (K, K)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
    # suppressed[i, j]: mask i (lower score when j < i) goes if j is kept
    suppressed = iou > iou_thresh
    if containment_thresh is not None:
        inside = inter / area[:, None].clamp(min=1)  # fraction of i inside j
        suppressed |= (inside > containment_thresh) & (area[None, :] > area[:, None])
    suppressed = suppressed.numpy()
    keep: list[int] = []
    for i in range(m.shape[0]):
        if not suppressed[i, keep].any():
            keep.append(i)
    return order[torch.tensor(keep, dtype=torch.long)]


def finalize_proposals(
    masks: Tensor,
    scores: Tensor,
    size: tuple[int, int],
    names: list[str] | None = None,
    min_area_frac: float = 0.0,
    max_proposals: int | None = None,
) -> EntityProposals:
    """Resize, drop small/empty masks, sort by score, cap: the common tail of every segmenter.

    masks: (K, h, w) bool, or float probabilities (thresholded at 0.5 after resizing).
    scores: (K,). size: (H, W) of the image. min_area_frac: a mask covering less than this
    fraction of the image's pixels is dropped (empty masks always are). max_proposals: keep at most
    this many (None: all).
    """
    if masks.shape[0] != scores.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for {scores.shape[0]} scores")
    masks = resize_masks(masks.detach().cpu(), size)
    scores = scores.detach().float().cpu().reshape(-1)
    area = masks.flatten(1).sum(1)  # (K,)
    keep = (area > 0) & (area >= min_area_frac * size[0] * size[1])
    idx = keep.nonzero().flatten()
    idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
    if max_proposals is not None:
        idx = idx[:max_proposals]
    kept_names = [names[i] for i in idx.tolist()] if names is not None else None
    return EntityProposals(masks[idx], scores[idx], kept_names)


def proposal_recall(
    proposals: EntityProposals, gt_masks: Tensor, iou_thresh: float = 0.5
) -> tuple[int, int]:
    """(hits, K_gt): ground-truth masks (K_gt, H, W) matched by some proposal with IoU >= thresh.

    Each ground-truth entity counts once, whatever the number of proposals (a recall, not a
    one-to-one matching); the proposals are read at the ground truth's size.
    """
    gt = gt_masks.detach().cpu().bool()
    if gt.shape[0] == 0:
        return 0, 0
    if len(proposals) == 0:
        return 0, int(gt.shape[0])
    masks = resize_masks(proposals.masks, tuple(gt.shape[-2:]))
    best = mask_iou(gt, masks).max(1).values  # (K_gt,)
    return int((best >= iou_thresh).sum()), int(gt.shape[0])
