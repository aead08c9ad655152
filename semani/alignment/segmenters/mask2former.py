"""``Mask2FormerSegmenter``: transformers' universal segmentation, panoptic, labels dropped.

Works with any ``Mask2FormerForUniversalSegmentation`` folder (COCO/ADE panoptic models, or the
class-agnostic one ``python train.py experiment=entityseg_shapes`` exports) and with OneFormer
(``OneFormerForUniversalSegmentation``; the task token is "panoptic"). The model and its image
processor are transformers'; the panoptic inference is the original Mask2Former's
(``panoptic_proposals``; transformers' ``post_process_panoptic_segmentation`` differs in a way
that breaks class-agnostic models, see there). Each segment is one proposal, its score the
query's class probability; the class is dropped. Segments do not overlap, so no NMS is needed.

Get a model folder with ``python scripts/download_weights.py --only mask2former`` (into
``pretrained/mask2former-swin-large-coco-panoptic``), or pass the hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from semani.alignment.segmenters.common import (
    ImageLike,
    Sample,
    image_size,
    to_uint8_image,
)
from semani.alignment.segmenters.hf_loading import from_pretrained, warn_allow_download
from semani.alignment.types import EntityProposals
from semani.modules.panoptic import panoptic_segments

log = logging.getLogger(__name__)

__all__ = ["Mask2FormerSegmenter", "panoptic_proposals"]

HOW_TO_GET = (
    "Get one with `python scripts/download_weights.py --only mask2former` (into "
    "pretrained/mask2former-swin-large-coco-panoptic; any Mask2Former or OneFormer "
    "universal-segmentation model works), "
    "or train the class-agnostic ShapesWorld one: `python train.py experiment=entityseg_shapes` "
    "(it exports pretrained/entityseg_shapes)."
)


class Mask2FormerSegmenter:
    """Class-agnostic panoptic proposals from a Mask2Former / OneFormer folder.

    model_name_or_path: a ``save_pretrained`` folder (config, weights, preprocessor config) or a
        hub id (transformers downloads it into the Hugging Face cache; offline, reads it there).
        allow_download: deprecated and ignored (a hub id is always downloaded unless offline).
    device: where the model runs. threshold: a query becomes a segment when its best non-null
        class probability exceeds this. mask_threshold: probability that binarises a query's
        mask. overlap_mask_area_threshold: a query keeps its segment only if at least this
        fraction of its mask survives the pixel-wise argmax (Mask2Former's panoptic rule).
    min_area_frac, max_proposals: see ``finalize_proposals``. task: OneFormer's task token.
    processor_kwargs: overrides of the image processor config (e.g. ``{size: {shortest_edge:
        512, longest_edge: 1024}}``).
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        allow_download: bool | None = None,
        device: str = "cpu",
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        min_area_frac: float = 0.0,
        max_proposals: int | None = None,
        task: str = "panoptic",
        processor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

        warn_allow_download(allow_download)
        self.threshold, self.mask_threshold = threshold, mask_threshold
        self.overlap_mask_area_threshold = overlap_mask_area_threshold
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        self.task, self.device = task, torch.device(device)
        config = from_pretrained(AutoConfig, model_name_or_path, how_to_get=HOW_TO_GET)
        self.is_oneformer = config.model_type == "oneformer"
        if self.is_oneformer:
            from transformers import OneFormerForUniversalSegmentation as model_cls

            proc_cls = AutoProcessor  # image processor + the task-token tokenizer
        elif config.model_type == "mask2former":
            from transformers import Mask2FormerForUniversalSegmentation as model_cls

            proc_cls = AutoImageProcessor
        else:
            raise ValueError(
                f"{model_name_or_path} holds a {config.model_type!r} model; the mask2former "
                "segmenter takes Mask2Former or OneFormer universal-segmentation models"
            )
        self.processor = from_pretrained(
            proc_cls, model_name_or_path, how_to_get=HOW_TO_GET, **(processor_kwargs or {})
        )
        model = from_pretrained(model_cls, model_name_or_path, how_to_get=HOW_TO_GET)
        self.model = model.to(self.device).eval().requires_grad_(False)
        log.info(
            "loaded %s from %s (%.1fM parameters, %d queries) on %s",
            type(model).__name__,
            model_name_or_path,
            sum(p.numel() for p in model.parameters()) / 1e6,
            config.num_queries,
            self.device,
        )

    @torch.no_grad()
    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> panoptic segments as proposals at (H, W)."""
        size = image_size(image)
        pixels = to_uint8_image(image)  # (3, H, W) uint8, the processor rescales and normalises
        if self.is_oneformer:
            inputs = self.processor(images=[pixels], task_inputs=[self.task], return_tensors="pt")
        else:
            inputs = self.processor(images=[pixels], return_tensors="pt")
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        outputs = self.model(**inputs)
        return panoptic_proposals(
            outputs,
            [size],
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_mask_area_threshold,
            min_area_frac=self.min_area_frac,
            max_proposals=self.max_proposals,
        )[0]


def panoptic_proposals(
    outputs: Any,
    sizes: list[tuple[int, int]],
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    min_area_frac: float = 0.0,
    max_proposals: int | None = None,
) -> list[EntityProposals]:
    """Universal-segmentation outputs of a batch -> one ``EntityProposals`` per image: the
    class-agnostic panoptic inference ``semani.modules.panoptic.panoptic_segments`` (see there)."""
    segments = panoptic_segments(
        outputs, sizes, threshold, mask_threshold, overlap_mask_area_threshold, min_area_frac,
        max_proposals,
    )  # fmt: skip
    return [EntityProposals(masks, scores) for masks, scores in segments]
