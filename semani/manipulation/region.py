"""Edit an entity at the photo's resolution: crop a context window around it, edit the crop,
paste it back (`editor.region=entity`; ours, not the paper's).

Every editor resizes what it edits to its model's size (SD: 512 px, SeMani-Trans: 256 px), so
on a 4000x3000 photo a small entity gets a few latent cells or tokens. With
``region="entity"`` an editor instead edits a window around the entity: the bounding box of
the mask (of the union of the masks, for several entities) grown by ``context`` times its
longer side on every side, made square where the image allows and clipped to it
(`context_box`). The editor runs its ordinary edit on the crop (resized to the model's size as
before) and the result is pasted into the photo (`edit_in_region`): the pixels outside the crop
are the input's, bit for bit, and inside it the editor's own composite keeps every pixel
outside the mask. An empty mask, or a window that covers the whole image, edits the whole image
as ``region="image"`` does.

An editor without its composite (`BlendedLatentEditor`'s published default) returns the
decoder's output over the whole crop, so the window's border then shows in the photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from semani.manipulation.pixels import as_mask, as_original, from_kind, to_kind

__all__ = [
    "REGIONS",
    "alignment_grid",
    "check_region",
    "context_box",
    "crop_image",
    "edit_in_region",
]

REGIONS = ("image", "entity")  # what an editor resizes to its model: the photo or a window
Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive
EditFn = Callable[[Any, list[Tensor]], Any]  # (image, masks) -> the editor's output


def check_region(region: str, context: float) -> tuple[str, float]:
    """Validate an editor's `region` and `context` arguments; returns them (context a float)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if isinstance(context, bool) or not isinstance(context, (int, float)):
        raise ValueError(f"context must be a number >= 0, got {context!r}")
    if not (math.isfinite(context) and context >= 0):
        raise ValueError(f"context must be a finite number >= 0, got {context}")
    return region, float(context)


def alignment_grid(editor: Any) -> tuple[int, int] | None:
    """The grid on which the alignment phase counts a proposal's cells (`min_tokens`): the
    editor's token grid when it edits the whole image; None with ``region="entity"``, whose
    window is fitted to the entity: a small entity of a large photo covers few cells of the
    whole image's grid but most of its window's, where the editor counts them itself
    (`MaskTooSmallError`)."""
    grid = getattr(editor, "token_grid", None)
    return grid if getattr(editor, "region", "image") == "image" else None


def _span(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
    """A window of `side` (at most `limit`) px around [lo, hi), shifted inside [0, limit)."""
    side = min(side, limit)
    start = (lo + hi - side) // 2  # centred; <= lo since side >= hi - lo
    start = min(max(start, 0), limit - side)
    return start, start + side


def context_box(mask: Any, margin: float, min_side: int = 1) -> Box:
    """The context window (y0, y1, x0, x1) of an (H, W) mask (bool, or >= 0.5 inside).

    The mask's bounding box, of longer side s, becomes a square of side
    ``max(ceil(s * (1 + 2 * margin)), min_side)`` centred on it (`margin` times s added on
    every side), shifted to lie inside the image and clipped to it where the image is smaller.
    It always holds the box. An empty mask gives the whole image.
    """
    m = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {m.shape}")
    H, W = m.shape
    ys, xs = np.nonzero(m >= 0.5)
    if len(ys) == 0:
        return 0, H, 0, W
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(math.ceil(max(y1 - y0, x1 - x0) * (1 + 2 * margin)), int(min_side))
    return (*_span(y0, y1, side, H), *_span(x0, x1, side, W))


def crop_image(image: Any, box: Box) -> Any:
    """`image` (any form of `semani.manipulation.pixels`) cut to `box`, in the same form."""
    y0, y1, x0, x1 = box
    if isinstance(image, Image.Image):
        return image.crop((x0, y0, x1, y1))
    if isinstance(image, np.ndarray):
        return image[y0:y1, x0:x1]  # (h, w, 3)
    return image[..., y0:y1, x0:x1]  # (3, h, w) or (1, 3, h, w)


def edit_in_region(
    region: str,
    context: float,
    image: Any,
    masks: Sequence[Any],
    edit: EditFn,
    min_side: int = 1,
) -> Any:
    """Run ``edit(image, masks)`` on the whole image (``region="image"``) or on the context
    window around the union of `masks` (``"entity"``), pasted back into the image.

    `edit` is an editor's ordinary edit; it returns images of its input's size and form (see
    `semani.manipulation.pixels.composite`). With ``"entity"`` it gets the cropped image and the
    cropped masks as (h, w) float tensors in [0, 1]; its outputs are pasted into copies of the
    input, which keep every pixel outside the window bit for bit. The result has the input's
    size and form.
    """
    if region == "image":
        return edit(image, list(masks))
    original, kind = as_original(image)  # (3, H, W)
    H, W = original.shape[-2:]
    pixel_masks = [as_mask(m, (H, W))[0, 0] for m in masks]  # each (H, W) in [0, 1]
    union = torch.stack(pixel_masks).amax(0)  # (H, W)
    box = context_box(union, context, min_side)
    if box == (0, H, 0, W):  # the window is the image: exactly the whole-image edit
        return edit(image, list(masks))
    y0, y1, x0, x1 = box
    out = edit(crop_image(image, box), [m[y0:y1, x0:x1] for m in pixel_masks])
    crops = from_kind(out, kind)  # (N, 3, h, w)
    pasted = original.to(crops.device).expand(len(crops), -1, -1, -1).clone()
    pasted[..., y0:y1, x0:x1] = crops  # (N, 3, H, W)
    return to_kind(pasted, kind)
