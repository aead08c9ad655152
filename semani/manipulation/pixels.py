"""The pixel side every editor shares: input forms, the model grid, and the exact composite.

An editor receives an image in any of the accepted forms (PIL, (H, W, 3) uint8 array, (3, H, W)
uint8 tensor or (3, H, W) float tensor in [-1, 1]) and a mask of the same size (white / True /
>= 0.5 = edit). `prepare_inputs` gives the `Source` (the input as given, for the composite), the
pixel mask at the input size, and image and mask on the model grid (each side rounded down to a
multiple of the model's factor, optionally scaled so that the longer side is `side`). After
generation, `composite` blends the result into the input with `feather_weights`: where the
weight is 0 (every pixel outside the mask) the output is the input, bit for bit, in the input's
own form. `overlay` draws a mask over an image (the `overlay.png` of manipulate.py, Table I's
grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import distance_transform_edt
from torch import Tensor

__all__ = [
    "Source",
    "as_mask",
    "as_original",
    "as_source",
    "composite",
    "feather_weights",
    "from_kind",
    "model_size",
    "overlay",
    "prepare_inputs",
    "resize_bilinear",
    "to_kind",
]

TINT, TINT_ALPHA = (255, 0, 0), 0.5  # overlay: the mask in half-transparent red


@dataclass
class Source:
    """An input image as the editors see it."""

    pixels: Tensor  # (1, 3, H, W) float32 in [-1, 1]
    original: Tensor  # (3, H, W) the input as given: uint8, or float in [-1, 1]
    kind: str  # "pil" | "numpy" | "uint8" | "float": how `composite` returns the result


def as_source(image: Any) -> Source:
    """The input image as a `Source` (see the module docstring for the accepted forms)."""
    original, kind = as_original(image)
    if kind == "float":
        pixels = original.float()
    else:
        pixels = original.float() / 255 * 2 - 1  # as diffusers: x / 255, then 2x - 1
    return Source(pixels=pixels[None], original=original, kind=kind)


def as_original(image: Any) -> tuple[Tensor, str]:
    """The input image as given, (3, H, W) uint8 or float, and its kind (`Source`'s fields)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB")).copy()
        original, kind = torch.from_numpy(arr).permute(2, 0, 1), "pil"  # (3, H, W) uint8
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"numpy images must be (H, W, 3) uint8, got {image.shape}, {image.dtype}"
            )
        original, kind = torch.from_numpy(image.copy()).permute(2, 0, 1), "numpy"
    elif isinstance(image, Tensor):
        original = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if original.dim() != 3 or original.shape[0] != 3:
            raise ValueError(f"image tensors must be (3, H, W) RGB, got {tuple(image.shape)}")
        original = original.detach().cpu()
        kind = "uint8" if original.dtype == torch.uint8 else "float"
    else:
        raise TypeError(f"image must be a PIL image, an array or a tensor, got {type(image)}")
    return original, kind


def as_mask(mask: Any, size: tuple[int, int]) -> Tensor:
    """A mask (PIL, array, tensor; bool, 0..255 uint8 or 0..1 float) -> (1, 1, H, W) in [0, 1]."""
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)
    else:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask).cpu()
        m = m.float() / 255 if m.dtype == torch.uint8 else m.float()
    while m.dim() > 2 and m.shape[0] == 1:  # (1, H, W), (1, 1, H, W): leading singletons only
        m = m[0]
    if tuple(m.shape) != tuple(size):
        raise ValueError(
            f"mask is {tuple(m.shape)} but the image is {tuple(size)} (H, W): give an (H, W) "
            "mask of the image's size"
        )
    return m[None, None]  # (1, 1, H, W)


def model_size(height: int, width: int, factor: int, side: int | None = None) -> tuple[int, int]:
    """(H, W) -> the model grid: optionally scaled so the longer side is `side`, then each side
    rounded down to a multiple of `factor` (at least `factor`)."""
    if side is not None:
        scale = side / max(height, width)
        height, width = round(height * scale), round(width * scale)
    return max(factor, height - height % factor), max(factor, width - width % factor)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size), antialiased bilinear; unchanged when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def prepare_inputs(
    image: Any, mask: Any, factor: int, side: int | None = None
) -> tuple[Source, Tensor, Tensor, Tensor]:
    """-> (source, pixel mask (1,1,H,W) in [0,1] at the input size, model-grid image (1,3,h,w)
    in [-1,1], model-grid mask (1,1,h,w) binary {0,1}); h, w multiples of `factor`."""
    src = as_source(image)
    H, W = src.original.shape[-2:]
    mask = as_mask(mask, (H, W))
    size = model_size(H, W, factor, side)
    pixels = resize_bilinear(src.pixels, size).clamp(-1, 1)  # (1, 3, h, w)
    grid_mask = (resize_bilinear(mask, size) >= 0.5).float()  # (1, 1, h, w), as diffusers
    return src, mask, pixels, grid_mask


def feather_weights(mask: Tensor | np.ndarray, feather: float) -> Tensor:
    """Blend weights of the edited image: 0 outside the mask, a ramp inside along its border.

    `mask` (H, W) is binarised at 0.5. With d = the Euclidean distance (scipy's
    `distance_transform_edt`) from a mask pixel to the nearest pixel outside the mask (d >= 1
    inside; the image's own border is no seam), the weight is `min(1, d / (feather + 1))`:
    the `feather` px band inside the mask along its border (d <= feather) ramps up from
    1 / (feather + 1), deeper pixels get 1, and `feather = 0` is the hard mask. Returns
    (H, W) float32.
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask, dtype=np.float32)
    inside = m >= 0.5
    if feather <= 0 or inside.all():
        return torch.from_numpy(inside.astype(np.float32))
    d = distance_transform_edt(inside)  # (H, W), 0 outside
    return torch.from_numpy(np.clip(d / (feather + 1), 0.0, 1.0).astype(np.float32))


def composite(src: Source, edited: Tensor, weights: Tensor) -> Any:
    """Blend `edited` (N, 3, H, W) in [0, 1] into the input with `weights` (H, W).

    Where the weight is 0 the result is the input itself (bit-identical); the result has the
    input's kind: a list of PIL images, (N, H, W, 3) uint8 numpy, (N, 3, H, W) uint8 or
    (N, 3, H, W) float in [-1, 1].
    """
    w = weights.to(edited.device, torch.float32)[None, None]  # (1, 1, H, W)
    orig = src.original.to(edited.device)[None]  # (1, 3, H, W)
    keep = w == 0
    if src.kind == "float":
        blend = orig.float() * (1 - w) + (edited * 2 - 1) * w  # (N, 3, H, W)
        return torch.where(keep, orig.float(), blend).to(orig.dtype)
    blend = (orig.float() * (1 - w) + edited * 255 * w).round().clamp(0, 255).to(torch.uint8)
    return to_kind(torch.where(keep, orig, blend).cpu(), src.kind)  # (N, 3, H, W) uint8


def to_kind(images: Tensor, kind: str) -> Any:
    """(N, 3, H, W) images (uint8, or float in [-1, 1] for "float") -> the form `kind` of a
    `Source`: the tensor itself ("uint8", "float"), (N, H, W, 3) numpy or a list of PIL."""
    if kind in ("uint8", "float"):
        return images
    out = images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) uint8
    return out if kind == "numpy" else [Image.fromarray(o) for o in out]


def from_kind(images: Any, kind: str) -> Tensor:
    """The inverse of `to_kind`: an editor's output of the form `kind` -> (N, 3, H, W)."""
    if kind == "pil":
        return torch.stack([as_original(o)[0] for o in images])
    if kind == "numpy":
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """`image` (RGB) with `mask` (H, W) bool tinted (`TINT` at `TINT_ALPHA`)."""
    arr = np.asarray(image).astype(np.float32)  # (H, W, 3)
    tint = np.asarray(TINT, np.float32)
    arr[mask] = arr[mask] * (1 - TINT_ALPHA) + tint * TINT_ALPHA
    return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
