"""``EntitySegSegmenter``: the paper's entity segmenter, EntitySeg, via detectron2.

``version=1`` is what the authors' SeMani-Trans code runs (``evaluate.py``): EntitySeg v1 with a
Swin-L backbone (``Entity/EntitySeg``, config ``configs/entity_swin_lw7_3x.yaml``), the model
called directly on the image as they do, instance confidence 0.0, the first (best) proposal
always kept and at most 5. ``version=2`` is CropFormer (EntitySeg v2), through its demo
predictor.

Neither detectron2 nor the Entity code is a pip dependency: they are built from source, and
nothing is imported until the segmenter is constructed. Without them the constructor raises an
ImportError that says how to install them (``INSTALL``).
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
EntitySeg needs detectron2 and the Entity code (github.com/qqlu/Entity), built from source:
  1. detectron2:  pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'
     (a C++ compiler, and the CUDA toolkit matching torch for GPU builds)
  2. the code:    git clone https://github.com/qqlu/Entity third_party/Entity
     version 1 (the authors'): repo_dir=third_party/Entity/Entity/EntitySeg (holds entityseg/),
       config_file=configs/entity_swin_lw7_3x.yaml
     version 2 (CropFormer): cd third_party/Entity/Entityv2/CropFormer/mask2former/modeling/
       pixel_decoder/ops && sh make.sh; repo_dir=third_party/Entity/Entityv2/CropFormer,
       config_file=configs/entityv2/entity_segmentation/cropformer_hornet_3x.yaml
  3. weights: the checkpoint of that config from the repository's model zoo (Entity/README.md
     for version 1, Entityv2/README.md for version 2), saved as {weights}.
Any other segmenter needs none of this: alignment/segmenter=mask2former|ovseg|sam|ground_truth."""


class EntitySegSegmenter:
    """EntitySeg entity proposals (class-agnostic masks + confidences) at the image's size.

    repo_dir: the Entity code's folder (version 1: ``Entity/EntitySeg``, holding
    ``entityseg/``; version 2: ``Entityv2/CropFormer``, holding ``mask2former/`` and
    ``demo_cropformer/``). config_file: its detectron2 config, relative to ``repo_dir`` or
    absolute. weights: the checkpoint file. confidence_threshold: proposals scoring below it are
    dropped (the authors' 0.0 with version 1; CropFormer's demo 0.5), except the best one when
    ``keep_first`` (the authors'). min_area_frac, max_proposals (5, as the authors): see
    ``finalize_proposals``. opts: extra detectron2 config overrides, ``["KEY", value, ...]``.
    """

    def __init__(
        self,
        repo_dir: str | Path | None,
        weights: str | Path,
        config_file: str | Path = "configs/entity_swin_lw7_3x.yaml",
        version: int = 1,
        device: str = "cpu",
        confidence_threshold: float = 0.0,
        keep_first: bool = True,
        min_area_frac: float = 0.0,
        max_proposals: int | None = 5,
        opts: list[Any] | None = None,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (EntitySeg) or 2 (CropFormer), got {version}")
        self.version, self.keep_first = version, keep_first
        self.confidence_threshold = confidence_threshold
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        build = _build_model if version == 1 else _build_predictor
        self.predictor = build(repo_dir, weights, config_file, device, opts or [])
        log.info("loaded EntitySeg v%d %s from %s on %s", version, config_file, weights, device)

    @torch.no_grad()
    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> at most ``max_proposals`` entity masks."""
        size = image_size(image)
        bgr = to_uint8_image(image).flip(0)  # (3, H, W) uint8 BGR, as detectron2 reads images
        if self.version == 1:  # the authors: the model itself on the image, no resizing
            inputs = [{"image": bgr, "height": size[0], "width": size[1]}]
            instances = self.predictor(inputs)[0]["instances"].to("cpu")
        else:
            hwc = np.ascontiguousarray(bgr.permute(1, 2, 0).numpy())  # (H, W, 3)
            instances = self.predictor(hwc)["instances"].to("cpu")
        masks = instances.pred_masks.bool()  # (N, H, W) at the input's size
        scores = instances.scores.float()  # (N,)
        keep = scores >= self.confidence_threshold
        if self.keep_first and len(scores):  # the authors keep the first proposal whatever
            keep[torch.argmax(scores)] = True
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


def _add_repo(repo_dir: str | Path | None, package: str, weights: str | Path) -> str:
    if repo_dir is None or not (Path(repo_dir) / package).is_dir():
        raise ImportError(
            f"repo_dir={repo_dir!r} is not the Entity code's folder (no {package}/ inside).\n"
            + INSTALL.format(weights=weights)
        )
    repo = str(Path(repo_dir).expanduser().resolve())
    if repo not in sys.path:
        sys.path.insert(0, repo)  # a project folder, not an installed package
    return repo


def _config_path(repo: str, config_file: str | Path) -> str:
    path = Path(config_file)
    return str(path if path.is_absolute() else Path(repo) / path)


def _build_model(
    repo_dir: str | Path | None,
    weights: str | Path,
    config_file: str | Path,
    device: str,
    opts: list[Any],
) -> Any:
    """EntitySeg v1's model as the authors build it (``train_net.setup`` +
    ``Trainer.build_model`` + ``DetectionCheckpointer``), in eval mode."""
    d2_config = _import("detectron2.config", weights)
    d2_modeling = _import("detectron2.modeling", weights)
    d2_checkpoint = _import("detectron2.checkpoint", weights)
    repo = _add_repo(repo_dir, "entityseg", weights)
    entityseg = _import("entityseg", weights)
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"no EntitySeg weights at {weights}.\n" + INSTALL.format(weights=weights)
        )
    cfg = d2_config.get_cfg()
    entityseg.add_entity_config(cfg)
    cfg.merge_from_file(_config_path(repo, config_file))
    cfg.merge_from_list([*opts, "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", device])
    cfg.freeze()
    model = d2_modeling.build_model(cfg).eval()
    d2_checkpoint.DetectionCheckpointer(model).load(str(weights))
    return model


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
    repo = _add_repo(repo_dir, "mask2former", weights)
    cropformer = _import("mask2former", weights)
    predictor_mod = _import("demo_cropformer.predictor", weights)
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"no CropFormer weights at {weights}.\n" + INSTALL.format(weights=weights)
        )
    cfg = d2_config.get_cfg()
    deeplab.add_deeplab_config(cfg)
    cropformer.add_maskformer2_config(cfg)
    cfg.merge_from_file(_config_path(repo, config_file))
    cfg.merge_from_list([*opts, "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", device])
    cfg.freeze()
    return predictor_mod.CropFormerPredictor(cfg)
