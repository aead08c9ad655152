"""``SamSegmenter``: SAM's automatic mask generation over a point grid, turned into entities.

transformers' SAM (``SamModel`` + ``SamProcessor``), the steps of its mask-generation pipeline
written out for one image without crops:

1. the image embedding is computed once; a ``points_per_side`` x ``points_per_side`` grid of
   single-point prompts (cell centres) is decoded in batches of ``points_per_batch``, three masks
   per point (``multimask_output``);
2. a mask survives when its predicted IoU > ``pred_iou_thresh`` and its stability score (IoU of
   the masks binarised at ``mask_threshold`` +- ``stability_score_offset``) >
   ``stability_score_thresh``;
3. entity proposals: greedy mask NMS in predicted-IoU order (``suppress_overlaps``): a mask is
   dropped when its mask IoU with a kept one is > ``nms_iou_thresh``, or when more than
   ``containment_thresh`` of it lies inside a LARGER kept mask (a part of an entity already
   proposed); computed on masks resized to at most ``nms_size`` px on the long side;
4. ``finalize_proposals``: masks at the image's size, ``min_area_frac``, sorted by predicted IoU,
   at most ``max_proposals``.

Get weights with ``python scripts/download_weights.py --only sam-vit-base`` (into
``pretrained/sam-vit-base``), or pass the hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from semani.alignment.segmenters.common import (
    ImageLike,
    Sample,
    finalize_proposals,
    image_size,
    resize_masks,
    suppress_overlaps,
    to_uint8_image,
)
from semani.alignment.segmenters.hf_loading import from_pretrained, warn_allow_download
from semani.alignment.types import EntityProposals

log = logging.getLogger(__name__)

__all__ = ["SamSegmenter", "point_grid"]

HOW_TO_GET = (
    "Get one with `python scripts/download_weights.py --only sam-vit-base` (into "
    "pretrained/sam-vit-base; sam-vit-large and sam-vit-huge work the same way)."
)


def point_grid(n_per_side: int) -> torch.Tensor:
    """(n², 2) cell centres of an n x n grid over [0, 1]², as (x, y), row by row."""
    c = (torch.arange(n_per_side, dtype=torch.float32) + 0.5) / n_per_side
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """(N,) IoU of each mask binarised at threshold + offset and at threshold - offset."""
    inter = (logits > threshold + offset).flatten(1).sum(1)
    union = (logits > threshold - offset).flatten(1).sum(1)
    return inter / union.clamp(min=1)


class SamSegmenter:
    """Automatic, class-agnostic entity proposals from SAM (see the module docstring)."""

    def __init__(
        self,
        model_name_or_path: str | Path,
        allow_download: bool | None = None,
        device: str = "cpu",
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        nms_iou_thresh: float = 0.7,
        containment_thresh: float | None = 0.9,
        nms_size: int = 256,
        min_area_frac: float = 0.0,
        max_proposals: int | None = None,
    ) -> None:
        from transformers import SamModel, SamProcessor

        warn_allow_download(allow_download)  # deprecated: hub ids download unless offline
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        self.device = torch.device(device)
        self.points_per_side, self.points_per_batch = points_per_side, points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.mask_threshold = mask_threshold
        self.nms_iou_thresh, self.containment_thresh = nms_iou_thresh, containment_thresh
        self.nms_size = nms_size
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        self.processor = from_pretrained(SamProcessor, model_name_or_path, how_to_get=HOW_TO_GET)
        model = from_pretrained(SamModel, model_name_or_path, how_to_get=HOW_TO_GET)
        self.model = model.to(self.device).eval().requires_grad_(False)
        log.info(
            "loaded SAM from %s (%.1fM parameters) on %s; %d x %d point grid",
            model_name_or_path,
            sum(p.numel() for p in model.parameters()) / 1e6,
            self.device,
            points_per_side,
            points_per_side,
        )

    @torch.no_grad()
    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> SAM's entity proposals at (H, W)."""
        size = image_size(image)
        inputs = self.processor(images=[to_uint8_image(image)], return_tensors="pt")
        reshaped = [int(v) for v in inputs["reshaped_input_sizes"][0]]  # (h, w) fed to SAM
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        grid = point_grid(self.points_per_side) * torch.tensor([reshaped[1], reshaped[0]])
        masks, scores = [], []
        for start in range(0, grid.shape[0], self.points_per_batch):
            points = grid[start : start + self.points_per_batch].to(self.device)  # (P, 2)
            out = self.model(
                image_embeddings=embeddings,
                input_points=points[None, :, None, :],  # (1, P, 1, 2)
                input_labels=torch.ones(
                    1, points.shape[0], 1, dtype=torch.long, device=self.device
                ),
                multimask_output=True,
            )
            logits = out.pred_masks[0].flatten(0, 1)  # (P * 3, h/4, w/4) low-resolution logits
            iou = out.iou_scores[0].flatten()  # (P * 3,)
            keep = iou > self.pred_iou_thresh  # cheap filter before upsampling
            if not keep.any():
                continue
            full = self.processor.image_processor.post_process_masks(
                [logits[keep][None]],
                inputs["original_sizes"],
                inputs["reshaped_input_sizes"],
                binarize=False,
            )[0][0]  # (N, H, W) logits at the image's size
            stable = (
                stability_score(full, self.mask_threshold, self.stability_score_offset)
                > self.stability_score_thresh
            )
            masks.append((full[stable] > self.mask_threshold).cpu())
            scores.append(iou[keep][stable].float().cpu())
        if not masks:
            empty = torch.zeros(0, *size, dtype=torch.bool)
            return finalize_proposals(empty, torch.zeros(0), size)
        masks_t, scores_t = torch.cat(masks), torch.cat(scores)  # (N, H, W), (N,)
        small = masks_t
        scale = self.nms_size / max(size)
        if scale < 1:
            small = resize_masks(
                masks_t, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            )
        keep_idx = suppress_overlaps(small, scores_t, self.nms_iou_thresh, self.containment_thresh)
        return finalize_proposals(
            masks_t[keep_idx],
            scores_t[keep_idx],
            size,
            None,
            self.min_area_frac,
            self.max_proposals,
        )
