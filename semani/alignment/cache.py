"""What the alignment phase computes once per image, kept for the next edit of the same image.

A second edit of a photo (another word, another text, another `select`) needs the same
segmenter proposals and the same word-independent scorer features (the CLIP patch tokens of the
token-wise scorer, the mask-prompted crop embeddings of `MaskPromptScorer`); only the text side
and the selection are new. `AlignmentCache(size)` keeps them for the last `size` images, keyed by
the image's exact bytes (a re-uploaded or edited image with one pixel changed is another image),
least recently used first out:

    aligner = EntityAligner(scorer, segmenter, cache=4)  # alignment.cache=4
    aligner.align(image, "bird")   # segments, encodes, scores
    aligner.align(image, "branch") # the cached proposals and features: only the word is new

The cached results are the ones the uncached path computes (the same tensors, bit for bit). A
text-conditioned segmenter's proposals are kept per word. Proposals made with a data set
`sample` (the ground-truth segmenter) are not cached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AlignmentCache", "fingerprint"]


def fingerprint(x: Tensor) -> str:
    """A digest of a tensor's shape, dtype and exact values (blake2b of its bytes)."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


class AlignmentCache:
    """An LRU of per-image entries: `get(fingerprint(image), key, make)` returns the entry's
    `key` value, computing it with `make()` on a miss. `hits` and `misses` count the lookups."""

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"cache size must be a number of images >= 1, got {size!r}")
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
