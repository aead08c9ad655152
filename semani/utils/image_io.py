"""Reading user images and masks robustly: any mode, any size, EXIF orientation applied.

`read_image(path)` -> an 8-bit RGB PIL image, as a person looking at the file sees it:

- EXIF orientation is applied first (`ImageOps.exif_transpose`): a phone JPEG stored sideways
  comes out upright, and every later size (masks, outputs) is the rotated one;
- transparency (RGBA, LA, palette PNGs with a transparent colour, ...) is **composited on
  white** (not dropped: the colour under a fully transparent pixel is arbitrary, often black);
- 16-bit greyscale (`I;16*`, `I`) is scaled to 8 bits (`round(v / 257)`: 0 -> 0, 65535 -> 255);
  Pillow itself reads 16-bit colour PNGs as 8-bit RGB(A), keeping the high byte; float (`F`)
  images are taken as [0, 1] when their maximum is <= 1, else as [0, 255];
- greyscale, bilevel, palette, CMYK, YCbCr, LAB and HSV images are converted to RGB;
- animated files give their first frame; Pillow's decompression-bomb limit (about 179
  megapixels) still applies.

`read_mask(path, size)` -> a (H, W) bool mask, white (>= 128) = True, resized (nearest) to
`size`; a transparent pixel counts as black (not painted), so a drawing of white strokes on a
transparent layer works as well as white on black.

Both raise `ImageReadError` (an `OSError`) naming the file when it is missing or not a readable
image, so a command line can print one line.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageReadError", "read_image", "read_mask"]

# modes with an alpha channel (premultiplied ones are un-premultiplied by Pillow's convert)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageReadError(OSError):
    """An image (or mask) file is missing, not an image, or truncated."""


def _open(path: str | os.PathLike) -> Image.Image:
    """The file's first frame, fully decoded, EXIF orientation applied (detached from the file)."""
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            out = ImageOps.exif_transpose(im)  # a copy (also without an Orientation tag)
    except FileNotFoundError as err:
        raise ImageReadError(f"cannot read image '{path}': no such file") from err
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImageReadError(f"cannot read image '{path}': {reason}") from err
    return out


def _grey8(im: Image.Image) -> Image.Image:
    """A wide greyscale image (16-bit, 32-bit int or float) -> 8-bit "L" (see the module doc)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        a = a * 255 if np.nanmax(a, initial=0.0) <= 1 else a
    else:
        a = a.astype(np.float64) / 257  # 16-bit: 65535 -> 255
    a = np.nan_to_num(a, nan=0.0)
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


def _on_white(im: Image.Image) -> Image.Image:
    """An image with alpha -> RGB composited on white."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file -> 8-bit RGB PIL image, upright, transparency on white (module doc)."""
    im = _open(path)
    if im.mode in _WIDE_GREY_MODES:
        return _grey8(im).convert("RGB")
    if im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        return _on_white(im)
    return im.convert("RGB") if im.mode != "RGB" else im


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file -> (H, W) bool, white (>= 128) = True; resized (nearest) to `size` = (H, W).

    Read like `read_image` (EXIF orientation, 16-bit scaling) except that transparency counts
    as black: the luminance is multiplied by the alpha.
    """
    im = _open(path)
    if im.mode in _WIDE_GREY_MODES:
        grey = _grey8(im)
    elif im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
        luma = np.asarray(Image.fromarray(rgba[..., :3].astype(np.uint8)).convert("L"))
        grey = Image.fromarray((luma * (rgba[..., 3] / 255)).round().astype(np.uint8), "L")
    else:
        grey = im.convert("L")
    if size is not None and (grey.height, grey.width) != tuple(size):
        grey = grey.resize((int(size[1]), int(size[0])), Image.Resampling.NEAREST)
    return np.asarray(grey) >= 128
