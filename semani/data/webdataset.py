"""Streaming image-caption pairs from tar shards (CC12M pre-training, ``data=cc12m``).

How to get CC12M
----------------
Download ``cc12m.tsv`` (https://github.com/google-research-datasets/conceptual-12m) and fetch
the images with img2dataset (https://github.com/rom1504/img2dataset)::

    sed -i '1s/^/url\\tcaption\\n/' cc12m.tsv
    img2dataset --url_list cc12m.tsv --input_format tsv --url_col url --caption_col caption \\
        --output_format webdataset --output_folder data/cc12m --image_size 256 \\
        --resize_mode center_crop --processes_count 16 --thread_count 64 --enable_wandb False

This writes ``data/cc12m/00000.tar ... 01242.tar`` (the count depends on the download), each
holding ``<key>.jpg`` + ``<key>.txt`` (+ ``<key>.json``) per sample, ``<key>`` a 9-digit number.
Point ``data.root`` at the folder and ``data.shards`` at the brace pattern of the shard names
(``{00000..01242}.tar``; an absolute path or URL pattern is used as is).

The pipeline (webdataset library): shard list from the brace pattern -> shuffled shard order in
training -> split by node (DDP rank) and DataLoader worker -> tar -> sample shuffle buffer in
training -> decode, resize/centre-crop, tokenize. With ``resampled=True`` each worker instead
draws shards at random forever and ``epoch_size`` samples make an epoch (the DDP-safe recipe).
A sample has ``image``, ``caption``, ``tokens`` and ``index`` (the numeric key, else a running
count). Unreadable images are counted and skipped (``on_corrupt="skip"``) or raise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import get_worker_info

from semani.data.base import CorruptImageError, DataLayoutError, OnCorrupt, load_image
from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import crop_resize, image_to_tensor

log = logging.getLogger(__name__)

__all__ = ["SampleDecoder", "make_webdataset", "resolve_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_LAYOUT = """\
  <root>/{00000..NNNNN}.tar   img2dataset webdataset shards: <key>.jpg + <key>.txt per sample
(set data.shards to the brace pattern of the shard names; see semani/data/webdataset.py)"""


def resolve_shards(root: str | Path | None, shards: str | list[str]) -> list[str]:
    """Expand a brace pattern (relative to ``root`` unless absolute or a URL) -> shard list.

    Local shards must exist; a missing one raises ``DataLayoutError``.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        if root is not None and "://" not in pattern and not pattern.startswith(("/", "pipe:")):
            pattern = f"{Path(root).expanduser()}/{pattern}"
        urls.extend(wds.shardlists.expand_urls(pattern))
    if not urls:
        raise DataLayoutError(f"shard pattern {shards!r} expands to no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise DataLayoutError(
            f"{len(missing)} of {len(urls)} shards are missing (e.g. {missing[0]}). Expected:\n"
            f"{WDS_LAYOUT}"
        )
    return urls


class SampleDecoder:
    """Pipeline stage: raw tar samples -> semani sample dicts (counts skipped images)."""

    def __init__(self, image_size: int, tokenizer: TextTokenizer, on_corrupt: OnCorrupt) -> None:
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.on_corrupt = on_corrupt
        self.n_corrupt = 0  # skipped samples in this process (each DataLoader worker counts)

    def decode(self, raw: dict[str, Any], count: int) -> dict[str, Any]:
        key = raw.get("__key__", str(count))
        name = f"{raw.get('__url__', '?')}:{key}"
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None or "txt" not in raw:
            raise CorruptImageError(f"sample {name} lacks an image (.jpg/.png/.webp) or a .txt")
        img = load_image(name, data=raw[ext])
        caption = raw["txt"].decode("utf-8", errors="replace").strip()
        return {
            "image": image_to_tensor(crop_resize(img, self.image_size)),  # (3, H, W)
            "caption": caption,
            "tokens": self.tokenizer([caption])[0],  # (L,)
            "index": int(key) if key.isdigit() else count,
        }

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for count, raw in enumerate(src):
            try:
                yield self.decode(raw, count)
            except CorruptImageError as err:
                if self.on_corrupt == "raise":
                    raise
                self.n_corrupt += 1
                log.warning("skipping corrupt sample (%d so far): %s", self.n_corrupt, err)


class _Take:
    """Pipeline stage: at most ``n`` samples over all ranks and workers (split evenly)."""

    def __init__(self, n: int, world_size: int = 1) -> None:
        self.n, self.world_size = n, world_size

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        parts = self.world_size * (info.num_workers if info is not None else 1)
        for i, sample in enumerate(src):
            if i >= math.ceil(self.n / parts):
                return
            yield sample


def make_webdataset(
    urls: list[str],
    image_size: int,
    tokenizer: TextTokenizer,
    train: bool = True,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    epoch_size: int | None = None,
    max_samples: int | None = None,
    world_size: int = 1,
    num_workers: int = 0,
    on_corrupt: OnCorrupt = "skip",
    seed: int = 0,
) -> wds.DataPipeline:
    """An ``IterableDataset`` of semani samples over the tar shards ``urls``.

    ``epoch_size`` (samples over all ranks and workers) ends an epoch after that many samples
    (required with ``resampled``); ``max_samples`` caps an evaluation pass.
    """
    handler = wds.reraise_exception if on_corrupt == "raise" else wds.warn_and_continue
    if resampled:
        if not epoch_size:
            raise ValueError("resampled shards never end: set epoch_size (samples per epoch)")
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if train:
            stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=handler))
    if train and shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100)))
    stages.append(SampleDecoder(image_size, tokenizer, on_corrupt))
    if max_samples is not None:
        stages.append(_Take(max_samples, world_size))
    pipeline = wds.DataPipeline(*stages)
    if epoch_size:
        pipeline = pipeline.with_epoch(max(1, epoch_size // (world_size * max(1, num_workers))))
    return pipeline
