"""What every entity segmenter shares: the interface, image conversion and post-processing.

A segmenter is any object with ``segment(image, sample=None) -> EntityProposals``; ``image`` is
a (3, H, W) float tensor in [-1, 1] (the data sets' convention) or a PIL image, ``sample`` the
data set sample it comes from (or None), and the proposals are K class-agnostic boolean masks
at (H, W), sorted by descending score.

Post-processing rules (``finalize_proposals`` applies them in this order):

1. masks are resized to the image's own size (nearest for bool masks, bilinear + threshold for
   soft ones) and binarised;
2. masks smaller than ``min_area_frac`` of the image (and empty ones) are dropped;
3. proposals are sorted by descending score (stable: ties keep the segmenter's order);
4. at most ``max_proposals`` are kept (the authors keep 5 EntitySeg proposals).

``suppress_overlaps`` is the mask NMS of the point-prompted SAM segmenter (see its docstring).
The tensor-level helpers (``resize_masks``, ``mask_iou``, the rules above as ``finalize_masks``,
the recall) live in ``semani.modules.panoptic``, which the entity-segmenter training uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from semani.alignment.types import EntityProposals
from semani.data.transforms import to_uint8
from semani.modules.panoptic import finalize_masks, mask_iou, mask_recall, resize_masks

log = logging.getLogger(__name__)

__all__ = [
    "ImageLike",
    "Sample",
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


# a data set sample (`image`, and `entity_masks` / `entity_names` where the data set has them)
Sample = Mapping[str, Any]


@runtime_checkable
class Segmenter(Protocol):
    """image -> K class-agnostic entity proposals at the image's own size, best first.

    `sample` is the data set sample the image comes from, when there is one (evaluation):
    the ground-truth segmenter reads its entity masks, learned segmenters ignore it.
    """

    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals: ...


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
    masks, scores, idx = finalize_masks(masks, scores, size, min_area_frac, max_proposals)
    kept_names = [names[i] for i in idx.tolist()] if names is not None else None
    return EntityProposals(masks, scores, kept_names)


def proposal_recall(
    proposals: EntityProposals, gt_masks: Tensor, iou_thresh: float = 0.5
) -> tuple[int, int]:
    """(hits, K_gt): ground-truth masks (K_gt, H, W) matched by some proposal with IoU >= thresh.

    Each ground-truth entity counts once, whatever the number of proposals (a recall, not a
    one-to-one matching); the proposals are read at the ground truth's size.
    """
    return mask_recall(proposals.masks, gt_masks, iou_thresh)
