"""The ShapesWorld classifier of the Inception Score: a tiny CNN for 64 px images.

A ShapesWorld image's class is the shape of its entity A (the subject of its captions), the
`NNN.<shape>` folder of its key (`semani.data.shapes.SHAPES`, 7 classes). With several shapes in
an image the label is ambiguous from the pixels alone (A is any of them), so a trained network
spreads p(y|x) over the shapes present: the IS then rewards images with few, clearly drawn
shapes and a varied choice of shapes over the set. Train it with
`python train.py experiment=classifier_shapes` (`semani.models.classifier_module`), which
writes `<run>/classifier/shapes_classifier.pt`; `load_shapes_classifier` reads that file or a
Lightning checkpoint of the training module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semani.metrics.classifiers import require_weights
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_strict,
)

log = logging.getLogger(__name__)

__all__ = [
    "SHAPES_CLASSIFIER_SOURCE",
    "ShapesClassifier",
    "class_from_key",
    "load_shapes_classifier",
]

SHAPES_CLASSIFIER_SOURCE = (
    "training it: `python train.py experiment=classifier_shapes` writes "
    "<run>/classifier/shapes_classifier.pt"
)
NET_PREFIX = "net."  # the classifier's keys inside the training module's state dict


def class_from_key(key: str) -> int:
    """A CUB-layout image key "NNN.<class name>/<image>" -> its 0-based class NNN - 1."""
    folder = key.split("/", 1)[0]
    number = folder.split(".", 1)[0]
    if not number.isdigit():
        raise ValueError(f"image key {key!r} does not start with a 'NNN.<class>/' folder")
    return int(number) - 1


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ShapesClassifier(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits; images resized to `image_size`.

    Args:
        num_classes: 7 for ShapesWorld.
        width: channels of the first stage (then 2x, 4x, 8x at 1/2, 1/4, 1/8 resolution).
        image_size: the input side the network is trained at.
    """

    def __init__(self, num_classes: int = 7, width: int = 16, image_size: int = 64) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "image_size": image_size}
        self.image_size = int(image_size)
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),  # (B, w, S, S)
            _block(w, 2 * w, 2),  # (B, 2w, S/2, S/2)
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),  # (B, 4w, S/4, S/4)
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 8 * w, 2),  # (B, 8w, S/8, S/8)
        )
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )  # fmt: skip
        x = self.features(images)  # (B, 8w, S/8, S/8)
        return self.head(x.mean(dim=(2, 3)))  # (B, num_classes)

    def export(self) -> dict[str, Any]:
        """The file `load_shapes_classifier` reads: {"config": ..., "state_dict": ...}."""
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {"config": dict(self.config), "state_dict": sd}


class _FrozenShapesClassifier(ShapesClassifier):
    def train(self, mode: bool = True) -> _FrozenShapesClassifier:
        return super().train(False)


def load_shapes_classifier(path: str | os.PathLike) -> ShapesClassifier:
    """A frozen `ShapesClassifier` from an exported file or a `ClassifierModule` checkpoint."""
    path = require_weights(path, "ShapesWorld classifier", SHAPES_CLASSIFIER_SOURCE)
    ckpt = load_checkpoint(path)
    sd = ckpt.get("state_dict")
    config = ckpt.get("config")
    if config is None and isinstance(ckpt.get("hyper_parameters"), Mapping):  # Lightning
        hp = ckpt["hyper_parameters"]
        config = {k: hp[k] for k in ("num_classes", "width", "image_size") if k in hp}
        if isinstance(sd, Mapping):
            sd = {k[len(NET_PREFIX) :]: v for k, v in sd.items() if k.startswith(NET_PREFIX)}
    if not isinstance(sd, Mapping) or not isinstance(config, Mapping):
        raise CheckpointMismatchError(
            f"'{path}' is neither an exported ShapesWorld classifier ({{'config', 'state_dict'}}) "
            f"nor a ClassifierModule checkpoint; its keys: {sorted(map(str, ckpt))[:10]}"
        )
    model = _FrozenShapesClassifier(**dict(config))
    load_state_dict_strict(model, sd, str(path), expected="a ShapesClassifier state dict")
    model.eval().requires_grad_(False)
    log.info("ShapesWorld classifier %s loaded from %s", dict(config), path)
    return model
