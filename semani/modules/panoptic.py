"""Entity masks from a universal-segmentation model (Mask2Former, OneFormer), on plain tensors.

- ``panoptic_segments``: Mask2Former's panoptic inference, class-agnostic (every kept query is
  its own segment, labels dropped), masks at each image's size, best first;
- ``finalize_masks``: the common tail of every entity segmenter (resize, drop small or empty
  masks, sort by score, cap);
- ``resize_masks``, ``mask_iou`` and ``mask_recall`` (how many ground-truth entities some mask
  finds at IoU >= a threshold), used by the segmenters and to validate the entity segmenter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["finalize_masks", "mask_iou", "mask_recall", "panoptic_segments", "resize_masks"]


def panoptic_segments(
    outputs: Any,
    sizes: list[tuple[int, int]],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    min_area_frac: float = 0.0,
    max_proposals: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Universal-segmentation outputs of a batch -> per image (masks (K, H, W) bool, scores (K,)),
    the masks at the image's size, best score first (``finalize_masks``).

    Mask2Former's panoptic inference (``panoptic_inference`` of the original code), without any
    label fusion (every query its own segment: entities, not classes) and labels dropped:

    1. a query is kept when its best class is not "no object" and that class's probability
       (the segment's score) exceeds ``threshold``;
    2. its mask logits (over the whole processed input, which the processor resized from the
       image without padding) are upsampled to the image's (H, W) and turned into
       probabilities; each pixel goes to the kept query of highest score x probability;
    3. a query's segment is the pixels it won AND where its own probability is >=
       ``mask_threshold``; it is dropped when empty or when it won less than
       ``overlap_mask_area_threshold`` of its own mask.

    transformers' ``post_process_panoptic_segmentation`` leaves out the "AND its own mask" of
    step 3, so every pixel, background included, lands in some segment. With a class-agnostic
    model whose background is not an entity (ShapesWorld) each segment then swallows background:
    the ``experiment=entityseg_shapes`` model finds 9% of the 396 entities of the 200 ShapesWorld
    test images (a proposal with IoU >= 0.5) that way, 98% with this inference.
    """
    class_logits = outputs.class_queries_logits  # (B, Q, C + 1), the last class is "no object"
    mask_logits = outputs.masks_queries_logits  # (B, Q, h, w)
    scores, labels = class_logits.softmax(-1).max(-1)  # (B, Q)
    no_object = class_logits.shape[-1] - 1
    segments = []
    for i, size in enumerate(sizes):
        keep = (labels[i] != no_object) & (scores[i] > threshold)
        score = scores[i, keep]  # (Qk,)
        masks, kept = [], []
        if len(score):
            probs = F.interpolate(
                mask_logits[i, keep][None].float(), size=size, mode="bilinear", align_corners=False
            )[0].sigmoid()  # (Qk, H, W)
            owner = (probs * score[:, None, None]).argmax(0)  # (H, W)
        for k in range(len(score)):
            won = owner == k
            own = probs[k] >= mask_threshold
            segment = won & own
            if not segment.any() or won.sum() < overlap_mask_area_threshold * own.sum():
                continue
            masks.append(segment)
            kept.append(k)
        if masks:
            masks_t, scores_t = torch.stack(masks).cpu(), score[kept].cpu()
        else:
            masks_t, scores_t = torch.zeros(0, *size, dtype=torch.bool), torch.zeros(0)
        kept_masks, kept_scores, _ = finalize_masks(
            masks_t, scores_t, size, min_area_frac, max_proposals
        )
        segments.append((kept_masks, kept_scores))
    return segments


def finalize_masks(
    masks: Tensor,
    scores: Tensor,
    size: tuple[int, int],
    min_area_frac: float = 0.0,
    max_proposals: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Resize, drop small/empty masks, sort by score, cap: the common tail of every segmenter.

    masks: (K, h, w) bool, or float probabilities (thresholded at 0.5 after resizing).
    scores: (K,). size: (H, W) of the image. min_area_frac: a mask covering less than this
    fraction of the image's pixels is dropped (empty masks always are). max_proposals: keep at most
    this many (None: all).

    Returns: masks (K', H, W) bool and scores (K',) on the CPU, best first, and the indices
    (K',) into the input of the ones kept.
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
    return masks[idx], scores[idx], idx


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


def mask_recall(masks: Tensor, gt_masks: Tensor, iou_thresh: float = 0.5) -> tuple[int, int]:
    """(hits, K_gt): ground-truth masks (K_gt, H, W) matched by some mask of ``masks`` (K, h, w)
    with IoU >= thresh.

    Each ground-truth entity counts once, whatever the number of masks (a recall, not a
    one-to-one matching); ``masks`` are read at the ground truth's size.
    """
    gt = gt_masks.detach().cpu().bool()
    if gt.shape[0] == 0:
        return 0, 0
    if masks.shape[0] == 0:
        return 0, int(gt.shape[0])
    masks = resize_masks(masks, tuple(gt.shape[-2:]))
    best = mask_iou(gt, masks).max(1).values  # (K_gt,)
    return int((best >= iou_thresh).sum()), int(gt.shape[0])
