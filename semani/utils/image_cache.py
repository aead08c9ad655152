"""A least-recently-used cache of per-input entries keyed by the input tensor's exact bytes.

`fingerprint(x)` digests a tensor (shape, dtype, every byte); `ImageCache(size)` keeps entries
for the last `size` distinct inputs. Used by the alignment phase (`semani.alignment.cache`:
proposals and scorer features per image) and the latent-diffusion editors
(`semani.manipulation.diff_editor`: VAE posteriors per model-grid input), so that a second edit
of the same photo skips what only depends on the photo.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageCache", "fingerprint"]


def fingerprint(x: Tensor) -> str:
    """A digest of a tensor's shape, dtype and exact values (blake2b of its bytes)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


class ImageCache:
    """An LRU of per-image entries: `get(fingerprint(image), key, make)` returns the entry's
    `key` value, computing it with `make()` on a miss. `hits` and `misses` count the lookups."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"cache size must be a number of inputs >= 1, got {size!r}")
        self.size = size
        self.hits = self.misses = 0
        self._images: OrderedDict[str, dict[Hashable, Any]] = OrderedDict()

    def get(self, digest: str, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value `key` of the image whose `fingerprint` is `digest`."""
        entry = self._images.get(digest)
        if entry is None:
            entry = self._images[digest] = {}
            while len(self._images) > self.size:
                self._images.popitem(last=False)
        self._images.move_to_end(digest)
        if key in entry:
            self.hits += 1
            return entry[key]
        self.misses += 1
        value = entry[key] = make()
        return value

    def clear(self) -> None:
        self._images.clear()

    def __len__(self) -> int:
        return len(self._images)
