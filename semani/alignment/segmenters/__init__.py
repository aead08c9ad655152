"""Entity segmenters: ``segment(image) -> EntityProposals``, class-agnostic, chosen by config.

| name (``configs/alignment/segmenter/``) | class | what |
|---|---|---|
| ``mask2former`` | ``Mask2FormerSegmenter`` | transformers' Mask2Former / OneFormer, panoptic |
| ``sam`` | ``SamSegmenter`` | SAM's automatic mask generation + mask NMS |
| ``grounding_sam`` | ``GroundingSamSegmenter`` | GroundingDINO boxes for the word -> SAM masks |
| ``entityseg`` | ``EntitySegSegmenter`` | CropFormer (the paper's), needs detectron2 |
| ``ovseg`` | ``OVSegSegmenter`` | OVSeg's MaskFormer (SeMani-Diff's), its detectron2 checkpoint |
| ``ground_truth`` | ``GroundTruthSegmenter`` | the data set's entity masks, with names |

``build_segmenter(cfg)`` makes one from a config with ``_target_`` (``hydra.utils.instantiate``
with the constructor's own errors) or from a name and keyword arguments
(``build_segmenter("sam", model_name_or_path=...)``). Only ``common`` and ``ground_truth`` are
imported eagerly; the backends import their libraries when built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from semani.alignment.segmenters.common import (
    Segmenter,
    finalize_proposals,
    mask_containment,
    mask_iou,
    proposal_recall,
    resize_masks,
    suppress_overlaps,
    to_uint8_image,
)
from semani.alignment.segmenters.ground_truth import GroundTruthSegmenter
from semani.alignment.segmenters.hf_loading import ModelNotFoundError

__all__ = [
    "SEGMENTERS",
    "EntitySegSegmenter",
    "GroundTruthSegmenter",
    "Mask2FormerSegmenter",
    "ModelNotFoundError",
    "SamSegmenter",
    "Segmenter",
    "build_segmenter",
    "finalize_proposals",
    "mask_containment",
    "mask_iou",
    "proposal_recall",
    "resize_masks",
    "suppress_overlaps",
    "to_uint8_image",
]

SEGMENTERS: dict[str, str] = {
    "mask2former": "semani.alignment.segmenters.mask2former.Mask2FormerSegmenter",
    "sam": "semani.alignment.segmenters.sam.SamSegmenter",
    "grounding_sam": "semani.alignment.segmenters.grounding_sam.GroundingSamSegmenter",
    "entityseg": "semani.alignment.segmenters.entityseg.EntitySegSegmenter",
    "ovseg": "semani.alignment.segmenters.ovseg.OVSegSegmenter",
    "ground_truth": "semani.alignment.segmenters.ground_truth.GroundTruthSegmenter",
}


def _resolve(path: str) -> Any:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:  # lazy backend classes: no transformers import on package load
    for path in SEGMENTERS.values():
        if path.endswith("." + name):
            return _resolve(path)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_segmenter(cfg: str | Mapping[str, Any], **kwargs: Any) -> Segmenter:
    """A segmenter from a config with ``_target_`` (Hydra) or from a name in ``SEGMENTERS``.

    ``kwargs`` override the config's keys (or are the constructor's arguments for a name).
    """
    if isinstance(cfg, str):
        if cfg not in SEGMENTERS:
            raise ValueError(f"unknown segmenter {cfg!r}; choose one of {sorted(SEGMENTERS)}")
        return _resolve(SEGMENTERS[cfg])(**kwargs)
    if "_target_" not in cfg:
        raise ValueError("a segmenter config needs a _target_ (configs/alignment/segmenter/)")
    from semani.utils.instantiators import instantiate_unwrapped

    return instantiate_unwrapped(cfg, _convert_="all", **kwargs)
