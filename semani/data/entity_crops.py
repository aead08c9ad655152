"""Masked entity crops with their names: the data of mask-prompt tuning and of crop-aware CLIPs.

`EntityCropDataset` wraps a caption data set whose samples carry ``entity_masks`` (K, H, W) and
``entity_names`` (ShapesWorld; COCO with ``instances_json``) and turns an image into one of its
entities, cut as the alignment phase cuts it (`semani.utils.masks.masked_crops`, OVSeg's rule):
the mask's bounding box, background pixels set to the CLIP mean colour, resized to the image
size. The caption is ``template.format(word=...)`` with the entity's name ("a photo of a
circle.") or, where the data set describes its entities (ShapesWorld's "small red circle") and
``describe_prob`` > 0, sometimes its description.

Which entity: a random one in training, entity ``index % K`` in evaluation (deterministic). An
image without entities (a COCO image whose instances all vanished in the crop) is skipped: the
next image is served. ``crop_prob`` < 1 mixes: with probability ``1 - crop_prob`` the wrapped
sample (the whole image and its own caption) is served instead; then only the keys common to
both kinds are kept (``image``, ``caption``, ``tokens``, ``index``).

``in_place_prob`` > 0: with that probability (training only) the entity is not cut out but kept
where it is, at its own scale, with every other pixel set to the fill colour: the whole image
holds one entity. A CLIP trained on such samples learns patch tokens for the entity's shape at
the scale it has in whole scenes, which the token-wise scorer compares with the word.

``with_entities``: every sample (crop or whole image) also carries ``entity_masks`` (K, S, S),
``entity_names`` (K names) and ``entity_words`` (each entity's name, or its description with
probability ``describe_prob``; a crop's is its caption's word): the crop's own mask, or the
image's entities. A CLIP trained with a region-word loss
(`ClipTrainModule(dense_loss_weight=...)`) reads them.

A crop sample: ``image`` (3, S, S) in [-1, 1], ``crop_mask`` (S, S) float {0, 1}, ``caption``,
``tokens`` (L,), ``entity_name`` str, ``index`` (the image's).
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN
from torch.utils.data import Dataset

from semani.data.base import CaptionImageDataset
from semani.utils.masks import masked_crops

__all__ = ["EntityCropDataset", "NoEntitiesError", "DEFAULT_CROP_TEMPLATE"]

DEFAULT_CROP_TEMPLATE = "a photo of a {word}."
MIXED_KEYS = ("image", "caption", "tokens", "index")
ENTITY_KEYS = ("entity_masks", "entity_names")


class NoEntitiesError(ValueError):
    """The wrapped data set gives no entity masks (not ShapesWorld, or COCO without instances)."""


class EntityCropDataset(Dataset):
    """Entity crops of `base`'s images (see the module docstring).

    Args:
        base: a caption data set with ``entity_masks``/``entity_names`` in its samples.
        crop_prob: probability that a sample is an entity crop (1: always).
        template: the crop caption, with ``{word}``.
        describe_prob: probability of captioning with the entity's description instead of its
            name, where ``base`` has ``entity_descriptions(i)``.
        fill: background colour, RGB in [0, 1] (the CLIP mean colour by default).
        square: pad the box to a square before resizing (the paper) instead of stretching it.
        in_place_prob: probability that a crop keeps the entity in place in the whole image
            (the rest filled) instead of cutting out its box; training only.
        with_entities: every sample also carries ``entity_masks``, ``entity_names`` and
            ``entity_words`` (module docstring).
        deterministic: default: ``base.deterministic``.
    """

    def __init__(
        self,
        base: CaptionImageDataset,
        crop_prob: float = 1.0,
        template: str = DEFAULT_CROP_TEMPLATE,
        describe_prob: float = 0.0,
        fill: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        square: bool = False,
        in_place_prob: float = 0.0,
        with_entities: bool = False,
        deterministic: bool | None = None,
    ) -> None:
        for arg, p in (("crop_prob", crop_prob), ("describe_prob", describe_prob),
                       ("in_place_prob", in_place_prob)):  # fmt: skip
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{arg} must be in [0, 1], got {p}")
        if "{word}" not in template:
            raise ValueError(f"template must contain '{{word}}', got {template!r}")
        if type(base).load_entities is CaptionImageDataset.load_entities:
            raise NoEntitiesError(
                f"{type(base).__name__} has no entity masks: entity crops need ShapesWorld "
                "(data.dataset=shapes) or COCO with data.instances_json"
            )
        self.base = base
        self.crop_prob = float(crop_prob)
        self.template = template
        self.describe_prob = float(describe_prob)
        self.fill = 2 * torch.tensor(list(fill), dtype=torch.float32) - 1  # (3,) in [-1, 1]
        self.square = square
        self.in_place_prob = float(in_place_prob)
        self.with_entities = bool(with_entities)
        self.deterministic = base.deterministic if deterministic is None else deterministic
        self.tokenizer = base.tokenizer
        size = base.image_size
        self.size = (size, size)

    def __len__(self) -> int:
        return len(self.base)

    def _coin(self, p: float) -> bool:
        if p >= 1.0:
            return True
        if p <= 0.0 or self.deterministic:
            return False
        return bool(torch.rand(()) < p)

    def _words(self, sample: dict[str, Any]) -> list[str]:
        """Each entity's name, or its description with probability `describe_prob`."""
        describe = getattr(self.base, "entity_descriptions", None)
        names = list(sample["entity_names"])
        if describe is None or self.describe_prob <= 0:
            return names
        descriptions = describe(sample["index"])
        return [d if self._coin(self.describe_prob) else n for n, d in zip(names, descriptions)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not self._coin(self.crop_prob):
            sample = self.base[index]
            out = {k: sample[k] for k in MIXED_KEYS}
            if self.with_entities:
                out.update({k: sample[k] for k in ENTITY_KEYS})
                out["entity_words"] = self._words(sample)
            return out
        for step in range(n):
            sample = self.base[(index + step) % n]
            masks = sample.get("entity_masks")
            if masks is None:
                raise NoEntitiesError(
                    f"{type(self.base).__name__} gave no entity masks (COCO: set "
                    "data.instances_json to the instances_*.json files)"
                )
            nonempty = torch.nonzero(masks.flatten(1).any(1)).flatten().tolist()
            if nonempty:
                break
        else:
            raise NoEntitiesError(f"no image of {self.base.root} has a visible entity")
        i = sample["index"]
        if self.deterministic:
            k = nonempty[index % len(nonempty)]
        else:
            k = nonempty[int(torch.randint(len(nonempty), ()))]
        if self._coin(self.in_place_prob) and not self.deterministic:
            crop_mask = (masks[k : k + 1] > 0.5).to(sample["image"].dtype)  # (1, S, S)
            fill = self.fill.view(3, 1, 1)
            crop = (sample["image"] * crop_mask + fill * (1 - crop_mask))[None]  # (1, 3, S, S)
        else:
            crop, crop_mask, _ = masked_crops(
                sample["image"], masks[k : k + 1] > 0.5, self.size, self.fill, square=self.square
            )  # (1, 3, S, S), (1, S, S)
        name = sample["entity_names"][k]
        word = name
        describe = getattr(self.base, "entity_descriptions", None)
        if describe is not None and self._coin(self.describe_prob):
            word = describe(i)[k]
        caption = self.template.format(word=word)
        out = {
            "image": crop[0].clamp(-1, 1),
            "caption": caption,
            "tokens": self.tokenizer([caption])[0],  # (L,)
            "index": i,
        }
        if self.with_entities:
            out.update(entity_masks=crop_mask[:1].float(), entity_names=[name])  # (1, S, S)
            out["entity_words"] = [word]
        if self.crop_prob < 1.0:
            return out
        return {**out, "crop_mask": crop_mask[0], "entity_name": name}
