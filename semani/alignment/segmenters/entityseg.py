"""``EntitySegSegmenter``: the paper's entity segmenter, CropFormer (EntitySeg v2), via detectron2.

Neither detectron2 nor CropFormer is a pip dependency: they are built from source, and nothing is
imported until the segmenter is constructed. Without them the constructor raises an ImportError
that says how to install them (``INSTALL``). The authors keep at most 5 proposals, best first.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semani.alignment.segmenters.common import (
    ImageLike,
    Sample,
    finalize_proposals,
    image_size,
    to_uint8_image,
)
from semani.alignment.types import EntityProposals

log = logging.getLogger(__name__)

__all__ = ["EntitySegSegmenter", "INSTALL"]

INSTALL = """\
EntitySeg (CropFormer) needs detectron2 and the CropFormer code, built from source:
  1. detectron2:  pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
     (a C++ compiler, and the CUDA toolkit matching torch for GPU builds)
  2. CropFormer:  git clone https://github.com/qqlu/Entity third_party/Entity
     cd third_party/Entity/Entityv2/CropFormer/mask2former/modeling/pixel_decoder/ops && sh make.sh
     and set repo_dir to third_party/Entity/Entityv2/CropFormer (the folder holding mask2former/
     and demo_cropformer/)
  3. weights: a CropFormer entity-segmentation checkpoint from the Entityv2 model zoo (the Entity
     repository's Entityv2/README.md), e.g. CropFormer_hornet_3x_03823a.pth, saved as
     {weights}, with its config configs/entityv2/entity_segmentation/cropformer_hornet_3x.yaml
     (config_file, relative to repo_dir).
Any other segmenter needs none of this: alignment/segmenter=mask2former|sam|ground_truth."""


class EntitySegSegmenter:
    """CropFormer entity proposals (class-agnostic masks + confidences) at the image's size.

    repo_dir: the CropFormer folder (holds ``mask2former/`` and ``demo_cropformer/``).
    config_file: its detectron2 config, relative to ``repo_dir`` or absolute. weights: the
    checkpoint file. confidence_threshold: proposals scoring below it are dropped (the demo's
    0.5). min_area_frac, max_proposals (5, as the authors): see ``finalize_proposals``.
    opts: extra detectron2 config overrides, ``["KEY", value, ...]``.
    """

    def __init__(
        self,
        repo_dir: str | Path | None,
        weights: str | Path,
        config_file: str | Path = "configs/entityv2/entity_segmentation/cropformer_hornet_3x.yaml",
        device: str = "cpu",
        confidence_threshold: float = 0.5,
        min_area_frac: float = 0.0,
        max_proposals: int | None = 5,
        opts: list[Any] | None = None,
    ) -> None:
        self.confidence_threshold = confidence_threshold
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        self.predictor = _build_predictor(repo_dir, weights, config_file, device, opts or [])
        log.info("loaded CropFormer %s from %s on %s", config_file, weights, device)

    @torch.no_grad()
    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> at most ``max_proposals`` entity masks."""
        size = image_size(image)
        bgr = to_uint8_image(image).permute(1, 2, 0).numpy()[:, :, ::-1]  # (H, W, 3) BGR
        instances = self.predictor(np.ascontiguousarray(bgr))["instances"].to("cpu")
        masks = instances.pred_masks.bool()  # (N, H, W) at the input's size
        scores = instances.scores.float()  # (N,)
        keep = scores >= self.confidence_threshold
        return finalize_proposals(
            masks[keep], scores[keep], size, None, self.min_area_frac, self.max_proposals
        )


def _import(name: str, weights: str | Path) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"cannot import {name!r} ({err}).\n" + INSTALL.format(weights=weights)
        ) from err


def _build_predictor(
    repo_dir: str | Path | None,
    weights: str | Path,
    config_file: str | Path,
    device: str,
    opts: list[Any],
) -> Any:
    """CropFormer's demo predictor (``demo_cropformer/predictor.py``), built from its config."""
    d2_config = _import("detectron2.config", weights)
    deeplab = _import("detectron2.projects.deeplab", weights)
    if repo_dir is None or not (Path(repo_dir) / "mask2former").is_dir():
        raise ImportError(
            f"repo_dir={repo_dir!r} is not a CropFormer folder (no mask2former/ inside).\n"
            + INSTALL.format(weights=weights)
        )
    repo = str(Path(repo_dir).expanduser().resolve())
    if repo not in sys.path:
        sys.path.insert(0, repo)  # CropFormer is a project folder, not an installed package
    cropformer = _import("mask2former", weights)
    predictor_mod = _import("demo_cropformer.predictor", weights)
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"no CropFormer weights at {weights}.\n" + INSTALL.format(weights=weights)
        )
    config_path = Path(config_file)
    if not config_path.is_absolute():
        config_path = Path(repo) / config_path
    cfg = d2_config.get_cfg()
    deeplab.add_deeplab_config(cfg)
    cropformer.add_maskformer2_config(cfg)
    cfg.merge_from_file(str(config_path))
    cfg.merge_from_list([*opts, "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", device])
    cfg.freeze()
    return predictor_mod.CropFormerPredictor(cfg)
