"""CLIP-score and image->text R@N (Table I) as DDP-synchronised torchmetrics `Metric`s.

Both take a frozen `semani.modules.clip.ClipModel` (images in [-1, 1], `encode_image`,
`encode_text`, L2-normalised embeddings): ResNet-50 CLIP in the paper (`load_clip("RN50",
"<pretrained_dir>/clip/RN50.pt")`), the ShapesWorld CLIP `semani-shapes-ViT` for ShapesWorld.

- `ClipScore`: the mean over images of 100 x cos(image, text), the paper's definition: no clamp
  at 0 (torchmetrics' `CLIPScore` uses max(100 cos, 0)), so a negative cosine counts as such.
- `ClipRecall`: for each image its target caption plus `n_candidates - 1` other captions drawn
  from `caption_pool` (distinct entries whose text differs from the target's), ranked by cosine;
  R@N = the percentage (0-100, as Table I) of images whose target is among the top N. The
  draw of image `index` uses `np.random.default_rng([seed, index])`, so it is reproducible and
  does not depend on batching or on how images are spread over processes. Ties favour the
  target (a caption counts against it only when scored strictly higher).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from semani.metrics.per_sample import as_index, select_samples
from semani.utils.hub import looks_like_hub_id

log = logging.getLogger(__name__)

__all__ = ["ClipRecall", "ClipScore", "clip_weights_source", "load_clip"]

SHAPES_CLIP = "semani-shapes-ViT"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def clip_weights_source(model_name: str) -> str:
    """Where the weights of a CLIP architecture come from (for error messages)."""
    import open_clip

    if model_name == SHAPES_CLIP:
        return (
            "training it: `python train.py experiment=clip_shapes` writes "
            "<run>/clip/open_clip_model.pt"
        )
    url = (open_clip.get_pretrained_cfg(model_name, "openai") or {}).get("url")
    if url:
        return url
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return f"open_clip's release of {model_name} (tags: {tags or 'none'})"


def load_clip(model_name: str = "RN50", pretrained: str | os.PathLike | None = None) -> nn.Module:
    """A frozen `ClipModel`; a missing weights file is an error naming it and its source.

    `pretrained`: a local checkpoint (OpenAI's TorchScript `RN50.pt`, an open_clip state dict),
    an open_clip tag ("openai") or a Hugging Face hub id holding open_clip weights (downloaded
    into the cache, or read from it offline: `semani.modules.clip.resolve_pretrained`), or None
    for a random init (tests only: the scores mean nothing).
    """
    from semani.modules.clip import ClipModel  # open_clip is slow to import: only when used

    if pretrained is None or str(pretrained) == "":
        log.warning("CLIP %s with RANDOM weights: CLIP metrics are meaningless", model_name)
        return ClipModel(model_name, None)
    text = str(pretrained)
    looks_like_file = text.endswith(_WEIGHT_SUFFIXES) or (
        os.sep in text and not looks_like_hub_id(text)
    )
    if looks_like_file and not Path(text).expanduser().is_file():
        raise FileNotFoundError(
            f"CLIP weights not found: '{text}' ({model_name}). Get them from "
            f"{clip_weights_source(model_name)} and put the file there (or point the config "
            "at it)."
        )
    return ClipModel(model_name, text)


def _encode(
    clip: nn.Module, images: Tensor, texts: Sequence[str] | Tensor
) -> tuple[Tensor, Tensor]:
    """(B, D) normalised image and text embeddings, without gradients, in float32."""
    with torch.no_grad():
        img = clip.encode_image(images, normalize=True).float()  # (B, D)
        txt = clip.encode_text(texts, normalize=True).float()  # (B, D)
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} texts")
    return img, txt


class ClipScore(Metric):
    """CLIP-score: mean of 100 x cos(CLIP image embedding, CLIP text embedding), no clamp.

    `update(images, texts, index=None)`: images (B, 3, H, W) in [-1, 1]; texts B captions or
    (B, L) CLIP token ids; `index` (B,) unique sample ids (duplicates from DDP padding are
    counted once). `compute()` -> a scalar.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, clip: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(
        self, images: Tensor, texts: Sequence[str] | Tensor, index: Tensor | None = None
    ) -> None:
        img, txt = _encode(self.clip, images, texts)
        self.scores.append(100 * (img * txt).sum(dim=-1))  # (B,)
        self.index.append(as_index(index, img.shape[0], img.device))

    def compute(self) -> Tensor:
        scores, index = dim_zero_cat(self.scores), dim_zero_cat(self.index)
        return scores[select_samples(index)].mean()


class ClipRecall(Metric):
    """Image->text R@N among the target caption and `n_candidates - 1` random other captions.

    Args:
        clip: the frozen CLIP (`ClipModel`).
        caption_pool: the captions the other candidates are drawn from (e.g. every caption of
            the test split); embedded once, on the device of the first update.
        ks: the N of R@N.
        n_candidates: the target plus this minus one other captions (100 in the paper).
        seed: the draw of image `index` is seeded with (seed, index).
        text_batch_size: captions per CLIP text batch when embedding the pool.

    `update(images, texts, index)`: images (B, 3, H, W) in [-1, 1], texts the B target captions
    (strings), index (B,) the images' ids (required: they seed the draws). `compute()` ->
    {"r1": ..., "r5": ..., "r10": ...} in percent.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        clip: nn.Module,
        caption_pool: Sequence[str],
        ks: Sequence[int] = (1, 5, 10),
        n_candidates: int = 100,
        seed: int = 0,
        text_batch_size: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.pool = [str(c).strip() for c in caption_pool]
        self.ks = tuple(int(k) for k in ks)
        self.n_candidates = int(n_candidates)
        if self.n_candidates < 1 or min(self.ks) < 1 or max(self.ks) > self.n_candidates:
            raise ValueError(f"need 1 <= N <= n_candidates={n_candidates} for every N in {ks}")
        if len(self.pool) < self.n_candidates - 1:
            raise ValueError(
                f"the caption pool has {len(self.pool)} captions, fewer than the "
                f"{self.n_candidates - 1} other candidates each image needs"
            )
        self.seed = int(seed)
        self.text_batch_size = int(text_batch_size)
        self._positions: dict[str, list[int]] = {}
        for i, c in enumerate(self.pool):
            self._positions.setdefault(c, []).append(i)
        self._pool_embeddings: Tensor | None = None  # (P, D), not a state: never synced
        self.add_state("ranks", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def pool_embeddings(self, device: torch.device) -> Tensor:
        """(P, D) normalised text embeddings of the caption pool (computed once)."""
        if self._pool_embeddings is None:
            chunks = []
            with torch.no_grad():
                for i in range(0, len(self.pool), self.text_batch_size):
                    batch = self.pool[i : i + self.text_batch_size]
                    chunks.append(self.clip.encode_text(batch, normalize=True).float())
            self._pool_embeddings = torch.cat(chunks)  # (P, D)
        self._pool_embeddings = self._pool_embeddings.to(device)
        return self._pool_embeddings

    def negatives(self, target: str, index: int) -> np.ndarray:
        """The pool positions of image `index`'s other candidates: (n_candidates - 1,)."""
        excluded = self._positions.get(target.strip(), [])
        n_neg = self.n_candidates - 1
        if len(self.pool) - len(excluded) < n_neg:
            raise ValueError(
                f"only {len(self.pool) - len(excluded)} pool captions differ from the target "
                f"{target!r}; {n_neg} are needed"
            )
        rng = np.random.default_rng([self.seed, int(index)])
        drawn = rng.choice(len(self.pool), size=n_neg + len(excluded), replace=False)
        if excluded:
            drawn = drawn[~np.isin(drawn, excluded)]
        return drawn[:n_neg]

    def update(self, images: Tensor, texts: Sequence[str], index: Tensor) -> None:
        if isinstance(texts, (str, Tensor)):
            raise TypeError("ClipRecall needs the target captions as a list of strings")
        if index is None:
            raise ValueError("ClipRecall needs the images' ids (index): they seed the draws")
        img, txt = _encode(self.clip, images, list(texts))
        index = as_index(index, img.shape[0], img.device)
        pool = self.pool_embeddings(img.device)
        neg = np.stack([self.negatives(t, i) for t, i in zip(texts, index.tolist())])
        neg = pool[torch.from_numpy(neg).to(img.device)]  # (B, K, D) K = n_candidates - 1
        own = (img * txt).sum(dim=-1, keepdim=True)  # (B, 1)
        others = torch.einsum("bd,bkd->bk", img, neg)  # (B, K)
        self.ranks.append((others > own).sum(dim=1))  # (B,) 0 = first
        self.index.append(index)

    def compute(self) -> dict[str, Tensor]:
        ranks, index = dim_zero_cat(self.ranks), dim_zero_cat(self.index)
        ranks = ranks[select_samples(index)]
        return {f"r{k}": 100 * (ranks < k).double().mean() for k in self.ks}
