"""The Inception Score classifiers: images in [-1, 1] -> logits, loaded from explicit paths.

- `TFInceptionV3` (COCO): torch-fidelity's port of the TF ImageNet Inception-v3 of the original
  Inception Score code (`weights-inception-2015-12-05-6726825d.pth`); uint8 input, TF1-exact
  bilinear resize to 299, 1008 "unbiased" logits (pool3 @ W, no bias, as the TF code and
  torch-fidelity's IS). torch-fidelity would download the file: here it is read from a path.
- `StackGANInceptionV3` (CUB, Oxford): StackGAN's Inception-v3 fine-tuned per data set (50 bird
  / 20 flower classes plus a background logit at index 0, which the IS metric drops with
  `drop_first_logit=True`), as a torchvision `Inception3` state dict. StackGAN released
  checkpoints of the old TF "slim" Inception-v3 of tensorflow/models' `inception/`
  (github.com/hanzhanggit/StackGAN-inception-model, `inception_finetuned_models/
  {birds,flowers}_valid299/model.ckpt`): convert them with `scripts/convert_stackgan_inception.py`
  (it reads the moving averages StackGAN's evaluation restores). The network is built as that TF
  graph computes: batch norm without scale, epsilon 0.001, and the 3x3 average pools of the
  mixed blocks ignore the zero padding (TF's SAME pooling; torchvision's stock blocks count it).
  Preprocessing as StackGAN's `inception_score.py`: uint8 image, bilinear resize to 299 (scipy's
  `imresize`, back to uint8), then `x / 127.5 - 1`.

The ShapesWorld classifier is `semani.metrics.shapes_classifier.ShapesClassifier`. All are
frozen: `eval()`, no gradients, and they stay in eval mode when a parent calls `.train()`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models import inception as tv_inception

from semani.data.transforms import to_uint8
from semani.utils.checkpoint import CheckpointMismatchError, load_state_dict_strict

log = logging.getLogger(__name__)

__all__ = [
    "STACKGAN_INCEPTION_SOURCE",
    "TF_INCEPTION_URL",
    "StackGANInceptionV3",
    "TFInceptionV3",
    "require_weights",
    "stackgan_inception3",
    "to_uint8",
]

TF_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
STACKGAN_INCEPTION_SOURCE = (
    "StackGAN's fine-tuned Inception-v3 (https://github.com/hanzhanggit/StackGAN-inception-model: "
    "inception_finetuned_models/{birds,flowers}_valid299/model.ckpt, TF), converted to a "
    "torchvision Inception3 state dict (fc with num_classes + 1 outputs, the background first) "
    "by: python scripts/convert_stackgan_inception.py --ckpt <model.ckpt> --out <file>"
)
INCEPTION_SIZE = 299
TF_BN_EPS = 1e-3  # the batch-norm epsilon of StackGAN's TF Inception-v3 (inception_score.py)


def require_weights(path: str | os.PathLike | None, what: str, source: str) -> Path:
    """`path` as a Path, or FileNotFoundError naming the file, what it is and where to get it."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"no weights file given for {what}; get them from {source}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{what} weights not found: '{p}'. Get them from {source} and put the file there "
            "(or point the config at it)."
        )
    return p


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A bare state dict, or the `state_dict` entry of a checkpoint, read weights-only."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


class _Frozen(nn.Module):
    """Stays in eval mode whatever a parent asks: a frozen scorer."""

    def train(self, mode: bool = True) -> _Frozen:
        return super().train(False)


class TFInceptionV3(_Frozen):
    """torch-fidelity's TF-ported ImageNet Inception-v3: (B, 3, H, W) in [-1, 1] -> (B, 1008).

    Args:
        path: `weights-inception-2015-12-05-6726825d.pth` (from `TF_INCEPTION_URL`).
        feature: the torch-fidelity output: "logits_unbiased" (the IS of the TF code and of
            torch-fidelity) or "logits" (with the fc bias).
    """

    def __init__(self, path: str | os.PathLike, feature: str = "logits_unbiased") -> None:
        super().__init__()
        path = require_weights(path, "TF ImageNet Inception-v3 (torch-fidelity)", TF_INCEPTION_URL)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:  # pragma: no cover - a dependency of the package
            raise ModuleNotFoundError(
                "TFInceptionV3 needs torch-fidelity: pip install torch-fidelity"
            ) from err
        if feature not in ("logits_unbiased", "logits"):
            raise ValueError(f"feature must be 'logits_unbiased' or 'logits', got {feature!r}")
        _read_state_dict(path)  # refuse a pickle that needs more than tensors
        # torch-fidelity reads the (now known to be plain) file itself and loads it strictly
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [feature], feature_extractor_weights_path=str(path)
        )
        self.eval().requires_grad_(False)
        log.info("TF Inception-v3 (torch-fidelity, %s) loaded from %s", feature, path)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1008) logits."""
        return self.net(to_uint8(images))[0]


def _tf_avg_pool3(x: Tensor) -> Tensor:
    """TF's 3x3 stride-1 SAME average pool: the padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _TFInceptionA(tv_inception.InceptionA):
    """Mixed_5b-5d with TF's average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool3(x))]


class _TFInceptionC(tv_inception.InceptionC):
    """Mixed_6b-6e with TF's average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool3(x))]


class _TFInceptionE(tv_inception.InceptionE):
    """Mixed_7b-7c with TF's average pool."""

    def _forward(self, x: Tensor) -> list[Tensor]:
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(_tf_avg_pool3(x))]


def stackgan_inception3(num_outputs: int, aux_logits: bool) -> nn.Module:
    """An untrained torchvision `Inception3` computing as StackGAN's TF Inception-v3.

    The state dict keys are torchvision's; the 3x3 average pools exclude the padding and every
    batch norm uses TF's epsilon (`TF_BN_EPS`). Input (B, 3, 299, 299) in [-1, 1].
    """
    blocks = [tv_inception.BasicConv2d, _TFInceptionA, tv_inception.InceptionB, _TFInceptionC,
              tv_inception.InceptionD, _TFInceptionE, tv_inception.InceptionAux]  # fmt: skip
    net = tv_inception.Inception3(
        num_classes=num_outputs, aux_logits=aux_logits, transform_input=False,
        inception_blocks=blocks, init_weights=False,
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = TF_BN_EPS
    return net


class StackGANInceptionV3(_Frozen):
    """StackGAN's per-data-set Inception-v3 as torchvision's `Inception3`.

    Args:
        path: a torchvision `Inception3` state dict (bare or under `state_dict`), converted from
            StackGAN's TF checkpoint by `scripts/convert_stackgan_inception.py`. AuxLogits
            weights may be present or not.
        num_classes: the real classes (CUB 50, Oxford 20).
        background_logit: the fc has `num_classes + 1` outputs, the background first (label 0 of
            StackGAN's TF graph).
        quantize: round to uint8 before and after the resize, as StackGAN's evaluation of saved
            images; False: resize the float images directly.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_classes: int,
        background_logit: bool = True,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        path = require_weights(path, "StackGAN fine-tuned Inception-v3", STACKGAN_INCEPTION_SOURCE)
        sd = _read_state_dict(path)
        n_out = num_classes + int(background_logit)
        fc = sd.get("fc.weight")
        if fc is not None and fc.shape[0] != n_out:
            raise CheckpointMismatchError(
                f"'{path}' has {fc.shape[0]} outputs, expected num_classes + background = "
                f"{num_classes} + {int(background_logit)} = {n_out}"
            )
        aux = any(k.startswith("AuxLogits.") for k in sd)
        self.net = stackgan_inception3(n_out, aux_logits=aux)
        load_state_dict_strict(
            self.net, sd, str(path), expected="a torchvision Inception3 state dict"
        )
        self.quantize = quantize
        self.eval().requires_grad_(False)
        log.info("StackGAN Inception-v3 (%d classes%s) loaded from %s",
                 num_classes, " + background" if background_logit else "", path)  # fmt: skip

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, 299, 299) in [-1, 1]."""
        x = to_uint8(images).float() if self.quantize else (images.float() + 1) * 127.5
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(
                x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                antialias=True,
            )  # fmt: skip
        if self.quantize:
            x = x.round().clamp(0, 255)
        return x / 127.5 - 1

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes [+ 1]) logits."""
        return self.net(self.preprocess(images))
