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

from semani.utils.image_cache import ImageCache, fingerprint

__all__ = ["AlignmentCache", "fingerprint"]

# proposals and scorer features per image: the generic per-input LRU
AlignmentCache = ImageCache
