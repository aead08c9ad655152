"""What the app (`semani.app`) accepts from a request, for a server others can reach.

Every request, from the page or through the API ("/edit"), is checked here before any model
runs (configs/app.yaml: `max_file_size`, `max_pixels`, `max_side`, `bounds`):

- `Limits.check`: every argument's type and range (steps and seed whole numbers, guidance and
  threshold numbers in range, entity and text strings under a length cap, strict a bool); a
  value out of range or of the wrong type is a `ValueError` naming it, never replaced;
- `check_upload`: the file's size on disk, then its width x height read from the header
  (`Image.open`, no `.load()`) before anything is decoded; Pillow's decompression-bomb error
  becomes the same `ImageTooLargeError`;
- `working_copy` / `paste_back`: an image whose longer side exceeds `max_side` is edited on a
  resized copy; the result is resized back and pasted into the upload inside the chosen mask
  (resized nearest), so every pixel outside it is the upload's, bit for bit;
- `public_message`: a message without server paths (the upload's path becomes its file name).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from semani.alignment.aligner import check_pick

__all__ = [
    "ImageTooLargeError",
    "Limits",
    "Request",
    "check_upload",
    "parse_size",
    "paste_back",
    "public_message",
    "working_copy",
]

log = logging.getLogger(__name__)

_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}  # as gradio counts them
# an absolute path of two or more parts, not inside a URL or a relative path
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?:/[^\s'\"`/()\[\]{},;]+){2,}")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageTooLargeError(ValueError):
    """An upload larger than the server takes (bytes or pixels)."""


def parse_size(size: str | int | None) -> int | None:
    """`"10mb"` -> bytes (b, kb, mb, gb, tb; 1 kb = 1024 b, as gradio's `max_file_size`)."""
    if size is None or isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?b)\s*", str(size).lower())
    if not match:
        raise ValueError(f"max_file_size must be like '10mb' (b, kb, mb, gb, tb), got {size!r}")
    return int(match[1]) * _UNITS[match[2]]


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} kB"


@dataclass(frozen=True)
class Request:
    """One request's checked arguments (None: the editor's own steps / guidance, no
    threshold)."""

    entity: str | None
    text: str
    steps: int | None
    guidance: float | None
    seed: int
    threshold: float | None
    strict: bool
    select: str | int = "best"


def _whole(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        if float(value).is_integer() and lo <= value <= hi:
            return int(value)
    got = "nothing" if value is None else repr(value)
    raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {got}")


def _real(name: str, value: Any, lo: float, hi: float, empty: str = "") -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        if lo <= value <= hi:  # NaN fails both
            return float(value)
    raise ValueError(f"{name} must be {empty}a number from {lo:g} to {hi:g}, got {value!r}")


def _words(name: str, value: Any, cap: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > cap:
        raise ValueError(f"{name} is {len(value)} characters long: at most {cap}")
    return value


@dataclass(frozen=True)
class Limits:
    """The app's limits (configs/app.yaml; the defaults are the config's). `max_file_size`
    in bytes, `max_pixels` width x height, `max_side` px (None: no limit); the bounds are
    (min, max), inclusive."""

    max_file_size: int | None = 10 * 2**20
    max_pixels: int | None = 25_000_000
    max_side: int | None = 1024
    steps: tuple[int, int] = (1, 200)
    guidance: tuple[float, float] = (0.0, 20.0)
    seed: tuple[int, int] = (0, 2**31 - 1)
    threshold: tuple[float, float] = (-1.0, 1.0)
    entity_chars: int = 200
    text_chars: int = 500

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        """The limits of an app config (its top-level `max_*` keys and `bounds`)."""
        bounds = cfg.get("bounds") or {}
        kw: dict[str, Any] = {
            "max_file_size": parse_size(cfg.get("max_file_size")),
            "max_pixels": cfg.get("max_pixels"),
            "max_side": cfg.get("max_side"),
        }
        for key in ("steps", "guidance", "seed", "threshold"):
            if key in bounds:
                kw[key] = tuple(bounds[key])
        for key in ("entity_chars", "text_chars"):
            if key in bounds:
                kw[key] = int(bounds[key])
        return cls(**kw)

    def start(self, name: str, value: float) -> float:
        """A control's starting value inside `bounds.<name>` (a warning when the editor's
        own is not)."""
        lo, hi = getattr(self, name)
        inside = min(max(value, lo), hi)
        if inside != value:
            log.warning(
                "the editor's %s=%s is outside bounds.%s [%s, %s]", name, value, name, lo, hi
            )
        return inside

    def describe(self) -> str:
        """The upload limits in a sentence for the page."""
        parts = []
        if self.max_file_size is not None:
            parts.append(f"at most {self.max_file_size / 2**20:g} MB")
        if self.max_pixels is not None:
            parts.append(f"{self.max_pixels / 1e6:g} megapixels")
        note = f"Uploads: {' and '.join(parts)}. " if parts else ""
        if self.max_side is not None:
            note += f"Larger than {self.max_side} px on a side: edited at {self.max_side} px."
        return note

    def check(
        self,
        entity: Any,
        text: Any,
        steps: Any,
        guidance: Any,
        seed: Any,
        threshold: Any,
        strict: Any,
        select: Any = "best",
    ) -> Request:
        """Every argument checked (see the module docstring); `ValueError` names the first
        that is out of range or of the wrong type. steps / guidance None: the editor's own;
        threshold None or blank: none; select blank: "best"."""
        if isinstance(threshold, str):
            raw = threshold.strip()
            try:
                threshold = float(raw) if raw else None
            except ValueError:
                threshold = raw
        if not isinstance(strict, (bool, np.bool_)):
            raise ValueError(f"strict must be true or false, got {strict!r}")
        if select is None or (isinstance(select, str) and not select.strip()):
            select = "best"
        try:
            select = check_pick(select.strip() if isinstance(select, str) else select)
        except ValueError:
            raise ValueError(
                f"select must be best, all, a rank (1: the best proposal, 2: the next...) or a "
                f"proposal of the table (#3), got {str(select)[:32]!r}"
            ) from None
        return Request(
            entity=_words("entity", entity, self.entity_chars).strip() or None,
            text=_words("text", text, self.text_chars),
            steps=None if steps is None else _whole("steps", steps, *self.steps),
            guidance=None if guidance is None else _real("guidance", guidance, *self.guidance),
            seed=_whole("seed", seed, *self.seed),
            threshold=None
            if threshold is None
            else _real("threshold", threshold, *self.threshold, empty="empty or "),
            strict=bool(strict),
            select=select,
        )


def _too_large(name: str, pixels: int, limit: int, size: tuple[int, int] | None) -> str:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return (
        f"the uploaded image {name!r} has {pixels / 1e6:.1f} megapixels{dims}: this server "
        f"takes at most {limit / 1e6:g} megapixels (max_pixels); scale it down and upload it "
        "again"
    )


def check_upload(path: str | os.PathLike, limits: Limits) -> tuple[int, int] | None:
    """The upload's (width, height) from its header; `ImageTooLargeError` when the file or
    its pixel count is over the limits. None when it is not a readable image (`read_image`
    then says why)."""
    name = os.path.basename(path)
    try:
        nbytes = os.path.getsize(path)
    except OSError:
        return None
    if limits.max_file_size is not None and nbytes > limits.max_file_size:
        raise ImageTooLargeError(
            f"the uploaded file {name!r} is {_size(nbytes)}: this server takes at most "
            f"{_size(limits.max_file_size)} (max_file_size)"
        )
    pil_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    limit = min(x for x in (limits.max_pixels, pil_limit, math.inf) if x is not None)
    try:
        with Image.open(path) as im:  # the header only: nothing is decoded
            size = im.size
    except Image.DecompressionBombError as err:  # more than twice Pillow's MAX_IMAGE_PIXELS
        found = _BOMB_PIXELS.search(str(err))
        pixels = int(found[1]) if found else int(limit) + 1
        raise ImageTooLargeError(_too_large(name, pixels, int(limit), None)) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        return None
    if size[0] * size[1] > limit:
        raise ImageTooLargeError(_too_large(name, size[0] * size[1], int(limit), size))
    return size


def working_copy(image: Image.Image, max_side: int | None) -> Image.Image:
    """`image` itself when its longer side is at most `max_side`, else a copy resized
    (Lanczos) so that it is `max_side`, the aspect ratio kept."""
    w, h = image.size
    if max_side is None or max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def paste_back(
    original: Image.Image, edited: Image.Image, mask: np.ndarray
) -> tuple[Image.Image, np.ndarray]:
    """The edit of a working copy at the original's size: `edited` resized (Lanczos) and
    pasted into `original` inside `mask` ((h, w) bool at the copy's size, resized nearest);
    returns the image and the mask at the original's size ((H, W) bool)."""
    big = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(
        original.size, Image.Resampling.NEAREST
    )
    out = original.convert("RGB")  # a copy
    out.paste(edited.convert("RGB").resize(original.size, Image.Resampling.LANCZOS), (0, 0), big)
    return out, np.asarray(big) > 127


def public_message(message: str, upload: str | os.PathLike | None = None) -> str:
    """`message` without server paths: the upload's path (as given and resolved) becomes its
    file name, any other absolute path its last part."""
    if upload:
        upload = os.fspath(upload)
        name = os.path.basename(upload)
        for path in sorted({upload, os.path.abspath(upload), os.path.realpath(upload)}, key=len)[
            ::-1
        ]:
            message = message.replace(path, name)
    return _ABS_PATH.sub(lambda m: m[0].rsplit("/", 1)[-1], message)
