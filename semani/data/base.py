"""Shared pieces of the caption data sets: file readers, the CUB crop, the base Dataset, collate.

- ``load_filenames``: reads AttnGAN/StackGAN ``{train,test}/filenames.pickle`` (Python-2 pickles
  of a list of keys) with a restricted unpickler that refuses anything but plain containers,
  strings, numbers and numpy arrays.
- ``read_captions``: one caption per non-empty line; a file with fewer than the data set's
  captions per image is an error naming the file (AttnGAN only printed a warning).
- ``load_image``: decodes the whole file; an unreadable image raises ``CorruptImageError``, which
  ``CaptionImageDataset`` either re-raises (``on_corrupt="raise"``) or counts, logs once and skips
  it by serving the next readable index (``on_corrupt="skip"``; ``index`` is the one served).
- ``cub_crop_box``: AttnGAN's ``get_imgs`` crop around the bird's bounding box.

A sample is a dict: ``image`` (3, H, W) float in [-1, 1], ``caption`` str, ``tokens`` (L,) long,
``index`` int and, where the data set has them, ``entity_masks`` (K, H, W) float {0, 1} and
``entity_names`` list[str]. Training picks a random caption of the image; evaluation
(``deterministic``, the default for every split but ``train``) picks caption ``index % n``.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import Box, crop_resize, image_to_tensor

log = logging.getLogger(__name__)

__all__ = [
    "CaptionFileError",
    "CaptionImageDataset",
    "CorruptImageError",
    "DataLayoutError",
    "collate_samples",
    "cub_crop_box",
    "load_filenames",
    "load_image",
    "read_captions",
    "require_paths",
]

OnCorrupt = Literal["skip", "raise"]


class DataLayoutError(FileNotFoundError):
    """The data root is missing or not laid out as the data set expects; `summary` says what
    is wrong and how to get the data in one line, the message adds the expected layout."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class CaptionFileError(ValueError):
    """A caption file is missing or holds too few captions."""


class CorruptImageError(OSError):
    """An image file cannot be read or decoded."""


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles of numpy arrays
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a filenames pickle holds only a list of keys"
        )


def load_filenames(path: str | Path) -> list[str]:
    """Read a ``filenames.pickle`` (list of keys, Python 2 or 3 pickle) -> list[str]."""
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
    if hasattr(obj, "tolist"):
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)) or not all(isinstance(k, (str, bytes)) for k in obj):
        raise DataLayoutError(f"{path} must hold a list of string keys, got {type(obj).__name__}")
    return [k.decode() if isinstance(k, bytes) else k for k in obj]


def read_captions(path: str | Path, n_captions: int) -> list[str]:
    """The first ``n_captions`` non-empty lines of a caption file (AttnGAN's cleaning)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"caption file {path} is missing")
    text = path.read_bytes().decode("utf-8", errors="replace")
    caps = [line.replace("\ufffd\ufffd", " ").strip() for line in text.splitlines()]
    caps = [c for c in caps if c]
    if len(caps) < n_captions:
        raise CaptionFileError(
            f"caption file {path} holds {len(caps)} captions, expected at least {n_captions} "
            "(one per line)"
        )
    return caps[:n_captions]


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image as RGB (from ``data`` if given, ``path`` then only names
    it); ``CorruptImageError`` if that fails."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err


def cub_crop_box(bbox: Sequence[float], width: int, height: int) -> Box:
    """AttnGAN ``get_imgs``: square of half-side 0.75·max(w, h) around the box centre, clipped.

    ``bbox`` is CUB's ``[x, y, w, h]`` (integers after AttnGAN's ``astype(int)``).
    Returns ``(x1, y1, x2, y2)`` for ``PIL.Image.crop``.
    """
    x, y, w, h = (int(v) for v in bbox)
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    y1, y2 = max(0, cy - r), min(height, cy + r)
    x1, x2 = max(0, cx - r), min(width, cx + r)
    return x1, y1, x2, y2


def require_paths(root: Path, relpaths: Sequence[str], layout: str, hint: str = "") -> None:
    """``DataLayoutError`` naming ``layout`` if ``root`` or any ``root/relpath`` is missing."""
    missing = [p for p in relpaths if not (root / p).exists()]
    if not root.is_dir() or missing:
        what = (
            f"data root {root} does not exist"
            if not root.is_dir()
            else (f"data root {root} lacks {', '.join(missing)}")
        )
        hint = hint.replace("<root>", str(root))
        raise DataLayoutError(
            f"{what}. Expected layout:\n{layout}" + (f"\n{hint}" if hint else ""),
            summary=f"{what}. {hint or 'See the data set docstring for its layout.'}",
        )


class CaptionImageDataset(Dataset):
    """Map-style base: subclasses fill ``keys`` and ``captions`` and give image paths/boxes.

    Subclasses implement ``image_path(i)`` and may override ``crop_box(i, w, h)`` and
    ``load_entities(i, box, size)``.
    """

    n_captions: int = 1

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 256,
        context_length: int = 128,
        deterministic: bool | None = None,
        on_corrupt: OnCorrupt = "skip",
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = int(image_size)
        self.deterministic = split != "train" if deterministic is None else bool(deterministic)
        self.on_corrupt = on_corrupt
        self.tokenizer = tokenizer or TextTokenizer(context_length)
        if self.tokenizer.context_length != context_length:
            raise ValueError(
                f"tokenizer context_length {self.tokenizer.context_length} != {context_length}"
            )
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        # unreadable images found so far in this process (each DataLoader worker counts its own);
        # they are skipped without another decode attempt
        self._corrupt: set[int] = set()
        self.n_corrupt = 0

    # -- to implement ---------------------------------------------------------------------------
    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def crop_box(self, i: int, width: int, height: int) -> Box | None:
        return None

    def load_entities(
        self, i: int, box: Box | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, list[str]] | None:
        return None

    # -- shared ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def _load_captions(self, paths: Sequence[Path]) -> None:
        self.captions = [read_captions(p, self.n_captions) for p in paths]

    def caption_index(self, i: int) -> int:
        """Which of image ``i``'s captions this draw uses (random in training)."""
        n = len(self.captions[i])
        if self.deterministic:
            return i % n
        return int(torch.randint(n, ()))

    def transform_caption(self, i: int, caption: str) -> str:
        """The caption that sample ``i`` serves (a subclass's augmentation; here unchanged)."""
        return caption

    def get_sample(self, i: int) -> dict[str, Any]:
        """Sample ``i`` without corrupt-image handling (raises ``CorruptImageError``)."""
        img = load_image(self.image_path(i))
        box = self.crop_box(i, *img.size)
        caption = self.transform_caption(i, self.captions[i][self.caption_index(i)])
        sample: dict[str, Any] = {
            "image": image_to_tensor(crop_resize(img, self.image_size, box)),  # (3, H, W)
            "caption": caption,
            "tokens": self.tokenizer([caption])[0],  # (L,)
            "index": i,
        }
        entities = self.load_entities(i, box, img.size)
        if entities is not None:
            sample["entity_masks"], sample["entity_names"] = entities  # (K, H, W), K names
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._corrupt:
                continue
            try:
                return self.get_sample(i)
            except CorruptImageError as err:
                if self.on_corrupt == "raise":
                    raise
                self._corrupt.add(i)
                self.n_corrupt = len(self._corrupt)
                log.warning("skipping corrupt image (%d so far): %s", self.n_corrupt, err)
        raise CorruptImageError(f"no readable image among the {n} images under {self.root}")


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (``image`` (B,3,H,W), ``tokens`` (B,L), ``index`` (B,)); keep ``caption``,
    ``entity_masks`` and ``entity_names`` as python lists of length B."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in ("caption", "entity_masks", "entity_names"):
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float, bool)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
