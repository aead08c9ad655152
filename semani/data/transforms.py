"""Image and mask transforms shared by every data set (PIL in, torch out).

All data sets produce square ``image_size`` images: an optional crop box (CUB's bird box),
then the shorter side is resized to ``image_size`` and the centre square is kept (a square crop
is simply resized). Masks follow the same geometry with nearest-neighbour resampling.
`to_grayscale` is the tensor conversion behind grayscale vision guidance, shared by training
(`SemaniTransModule`) and editing (`TransEditor`) so that both see exactly the same pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import rgb_to_grayscale

__all__ = [
    "crop_resize",
    "from_uint8",
    "image_to_tensor",
    "mask_to_tensor",
    "masks_to_tensor",
    "to_grayscale",
    "to_uint8",
]

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive (PIL crop convention)


def crop_resize(
    img: Image.Image,
    size: int,
    box: Box | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Crop ``img`` to ``box`` (if given), resize the shorter side to ``size``, centre-crop."""
    if box is not None:
        img = img.crop(box)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any shape) -> uint8 in [0, 255], rounded as a saved PNG is
    (torchvision's `save_image`: x * 255 + 0.5, truncated); on the images' device."""
    return ((images.detach().float() + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] (any shape) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def mask_to_tensor(
    mask: Image.Image | np.ndarray, size: int, box: Box | None = None
) -> torch.Tensor:
    """Binary mask (PIL 'L'/'1' or (H, W) array, nonzero = entity) -> (size, size) float {0, 1}."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    mask = crop_resize(mask.convert("L"), size, box, Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


def masks_to_tensor(
    masks: list[Image.Image | np.ndarray], size: int, box: Box | None = None
) -> torch.Tensor:
    """List of K masks -> (K, size, size) float {0, 1} (K may be 0)."""
    if not masks:
        return torch.zeros(0, size, size)
    return torch.stack([mask_to_tensor(m, size, box) for m in masks])


def to_grayscale(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> luma (ITU-R 601) replicated to 3 channels, same range.

    The vision-guidance input: `SemaniTransModule` encodes it to the gray tokens in training and
    `TransEditor` at edit time, so both must call this one function.
    """
    return rgb_to_grayscale(images, num_output_channels=3)  # (B, 3, H, W)
