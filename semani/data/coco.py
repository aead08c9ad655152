"""COCO-2014 with 5 captions per image, in AttnGAN's layout (``data=coco``), and optional
instance masks as entity ground truth.

How to get it
-------------
1. Images: ``train2014.zip`` and ``val2014.zip`` from https://cocodataset.org/#download; put every
   ``COCO_train2014_*.jpg`` and ``COCO_val2014_*.jpg`` directly in ``coco/images/``.
2. Captions and splits: AttnGAN's preprocessed COCO metadata (``coco.zip`` linked from
   https://github.com/taoxugit/AttnGAN), holding ``text/<key>.txt`` (5 captions per image; a few
   files hold more, the first 5 are used), ``train/filenames.pickle`` (82783 train2014 keys) and
   ``test/filenames.pickle`` (40504 val2014 keys), keys like ``COCO_train2014_000000000009``.
3. Optional entity ground truth: ``annotations_trainval2014.zip`` (same page), giving
   ``annotations/instances_train2014.json`` and ``instances_val2014.json``; set
   ``data.instances_json`` to one file or to ``{train: <json>, test: <json>}``.

Layout (``data.root`` = the ``coco`` folder)::

    coco/
      images/COCO_train2014_000000000009.jpg, ..., COCO_val2014_000000000042.jpg, ...
      text/COCO_train2014_000000000009.txt    5+ captions, one per line
      train/filenames.pickle                  pickled list of keys
      test/filenames.pickle
      annotations/instances_{train,val}2014.json   (optional)

With instances, a sample also holds ``entity_masks`` (K, H, W) — one per non-crowd instance,
cropped/resized like the image, instances that vanish in the crop dropped — and ``entity_names``
(the K category names, e.g. "dog"; a name repeats for several instances). Images are resized
(shorter side) and centre-cropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from semani.data.base import (
    CaptionImageDataset,
    DataLayoutError,
    OnCorrupt,
    load_filenames,
    require_paths,
)
from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import Box, masks_to_tensor

log = logging.getLogger(__name__)

__all__ = ["COCODataset", "COCO_LAYOUT", "coco_image_id", "polygon_or_rle_to_mask"]

COCO_LAYOUT = """\
  <root>/images/COCO_{train,val}2014_XXXXXXXXXXXX.jpg
  <root>/text/COCO_{train,val}2014_XXXXXXXXXXXX.txt   5 captions, one per line
  <root>/{train,test}/filenames.pickle                pickled list of keys (file names w/o .jpg)
(data.root is AttnGAN's `coco` folder; see semani/data/coco.py for where to get it)"""


def coco_image_id(key: str) -> int:
    """``COCO_train2014_000000000009`` -> 9."""
    try:
        return int(key.rsplit("_", 1)[-1])
    except ValueError:
        raise DataLayoutError(
            f"COCO key {key!r} does not end in an image id (expected COCO_train2014_XXXXXXXXXXXX)"
        ) from None


def polygon_or_rle_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> (H, W) uint8."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def _load_instances(path: Path, image_ids: set[int]) -> dict[int, dict[str, Any]]:
    """image id -> {"size": (h, w), "anns": [(segmentation, category name), ...]} (non-crowd)."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataLayoutError(f"instances_json {path} does not exist (instances_*2014.json)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(path))
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    out: dict[int, dict[str, Any]] = {}
    for img_id in image_ids & set(coco.imgs):
        info = coco.imgs[img_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=False))
        out[img_id] = {
            "size": (int(info["height"]), int(info["width"])),
            "anns": [(a["segmentation"], names[a["category_id"]]) for a in anns],
        }
    log.info("loaded instance masks of %d images from %s", len(out), path)
    return out


class COCODataset(CaptionImageDataset):
    """COCO-2014, AttnGAN layout; 5 captions per image; optional instance masks."""

    n_captions = 5

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 256,
        context_length: int = 128,
        deterministic: bool | None = None,
        on_corrupt: OnCorrupt = "skip",
        tokenizer: TextTokenizer | None = None,
        instances_json: str | Path | Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            root, split, image_size, context_length, deterministic, on_corrupt, tokenizer
        )
        require_paths(self.root, ["images", "text", f"{split}/filenames.pickle"], COCO_LAYOUT)
        self.keys = load_filenames(self.root / split / "filenames.pickle")
        self._load_captions([self.root / "text" / f"{k}.txt" for k in self.keys])
        self._instances: dict[int, dict[str, Any]] | None = None
        if isinstance(instances_json, Mapping):
            if split not in instances_json:
                raise ValueError(f"instances_json has no entry for split {split!r}")
            instances_json = instances_json[split]
        if instances_json:
            ids = {coco_image_id(k) for k in self.keys}
            self._instances = _load_instances(Path(instances_json), ids)
            if not self._instances:
                raise DataLayoutError(
                    f"{instances_json} holds none of the {split} split's images; use "
                    "instances_train2014.json for train and instances_val2014.json for test"
                )
            if len(self._instances) < len(ids):
                log.warning(
                    "%s lacks %d of the %d %s images; they get no entity masks",
                    instances_json,
                    len(ids) - len(self._instances),
                    len(ids),
                    split,
                )

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{self.keys[i]}.jpg"

    def load_entities(
        self, i: int, box: Box | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, list[str]] | None:
        if self._instances is None:
            return None
        entry = self._instances.get(coco_image_id(self.keys[i]))
        if entry is None:
            return torch.zeros(0, self.image_size, self.image_size), []
        h, w = entry["size"]
        masks, names = [], []
        for seg, name in entry["anns"]:
            m = polygon_or_rle_to_mask(seg, h, w)  # (h, w) uint8 in annotation coordinates
            if (w, h) != size:  # image file differs from the annotated size: follow the file
                m = np.asarray(Image.fromarray(m * 255).resize(size, Image.Resampling.NEAREST))
            masks.append(m)
            names.append(name)
        t = masks_to_tensor(masks, self.image_size, box)  # (K, H, W)
        keep = t.flatten(1).any(dim=1) if len(names) else torch.zeros(0, dtype=torch.bool)
        return t[keep], [n for n, k in zip(names, keep.tolist()) if k]
