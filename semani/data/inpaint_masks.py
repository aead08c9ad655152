"""Inpainting masks for SeMani-Diff training: entity masks, random boxes and brush strokes.

Every random draw comes from a `torch.Generator` passed in, so a seed gives the same masks on
any machine. Masks are (H, W) float tensors with values in {0, 1}; 1 = the region to re-paint
(diffusers' convention: the masked image is `x * (mask < 0.5)`).

- `random_box_mask`: one axis-aligned rectangle covering a fraction of the image in
  [min_cover, max_cover] (exactly, in pixels), aspect ratio at most `max_aspect` where possible.
- `random_stroke_mask`: free-form brush strokes (DeepFill-v2 / LaMa style poly-lines of round
  brushes) added segment by segment until the coverage reaches a target drawn in
  [min_cover, max_cover]; a segment that would pass max_cover is dropped.
- `MaskSampler`: per sample, an entity mask of the data set (one entity, or the union of several)
  or a random box / stroke mask, by configurable probabilities.
- `InpaintMaskDataset`: the same draw made in the DataLoader workers (``data.inpaint_masks``),
  so that the training step's main process does not spend its time drawing masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from semani.data.shapes_generator import with_article

__all__ = [
    "MASK_KINDS",
    "InpaintMaskDataset",
    "MaskSampler",
    "random_box_mask",
    "random_stroke_mask",
]

MASK_KINDS = ("entity", "box", "stroke")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _check_cover(min_cover: float, max_cover: float) -> None:
    if not 0.0 < min_cover <= max_cover <= 1.0:
        raise ValueError(f"need 0 < min_cover <= max_cover <= 1, got {min_cover}, {max_cover}")


def random_box_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    min_cover: float = 0.1,
    max_cover: float = 0.5,
    max_aspect: float = 3.0,
) -> Tensor:
    """One random rectangle: (H, W) float {0, 1} covering [min_cover, max_cover] of the image.

    The box height is drawn among those for which some width gives an allowed area (and an
    aspect ratio <= `max_aspect`, unless no box satisfies both), the width among the allowed
    ones for that height, then the position uniformly.
    """
    _check_cover(min_cover, max_cover)
    area = height * width
    lo, hi = math.ceil(min_cover * area), math.floor(max_cover * area)

    def widths(bh: int, aspect: float) -> tuple[int, int]:
        w_lo = max(1, math.ceil(lo / bh), math.ceil(bh / aspect))
        w_hi = min(width, hi // bh, math.floor(bh * aspect))
        return w_lo, w_hi

    def allowed(aspect: float) -> list[int]:
        spans = ((bh, widths(bh, aspect)) for bh in range(1, height + 1))
        return [bh for bh, (w_lo, w_hi) in spans if w_lo <= w_hi]

    aspect = max_aspect
    heights = allowed(aspect)
    if not heights:  # e.g. a very thin image: drop the aspect limit
        aspect = math.inf
        heights = allowed(aspect)
    if not heights:
        raise ValueError(f"no box of a {height}x{width} image covers [{min_cover}, {max_cover}]")
    bh = heights[_randint(generator, 0, len(heights) - 1)]
    bw = _randint(generator, *widths(bh, aspect))
    top, left = _randint(generator, 0, height - bh), _randint(generator, 0, width - bw)
    mask = torch.zeros(height, width)
    mask[top : top + bh, left : left + bw] = 1.0
    return mask


def _draw_segment(img: Image.Image, p0: tuple[float, float], p1: tuple[float, float], w: int):
    """A round-brush segment of width `w` from p0 to p1 (round caps at both ends)."""
    draw = ImageDraw.Draw(img)
    draw.line([p0, p1], fill=255, width=w)
    r = w / 2
    for x, y in (p0, p1):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)


def random_stroke_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    min_cover: float = 0.1,
    max_cover: float = 0.5,
    brush_width: tuple[float, float] = (0.04, 0.12),
    segment_length: tuple[float, float] = (0.1, 0.3),
    max_vertices: int = 6,
    max_tries: int = 200,
) -> Tensor:
    """Free-form brush strokes: (H, W) float {0, 1} covering [min_cover, max_cover].

    A target coverage is drawn in [min_cover, max_cover]; strokes (poly-lines of 1 to
    `max_vertices` segments, each of random angle and length `segment_length` x the longer
    side, brush width `brush_width` x the longer side) are added one segment at a time until the
    coverage reaches the target. A segment that would push the coverage past `max_cover` is
    dropped and the stroke ends. After `max_tries` segments without reaching `min_cover` (never
    seen with the defaults) a box mask with the same bounds is returned instead.
    """
    _check_cover(min_cover, max_cover)
    side = max(height, width)
    target = _uniform(generator, min_cover, max_cover)
    img = Image.new("L", (width, height), 0)
    cover = 0.0
    tries = 0
    while cover < target and tries < max_tries:
        x, y = _uniform(generator, 0, width - 1), _uniform(generator, 0, height - 1)
        brush = max(1, round(_uniform(generator, *brush_width) * side))
        for _ in range(_randint(generator, 1, max_vertices)):
            tries += 1
            angle = _uniform(generator, 0.0, 2 * math.pi)
            length = _uniform(generator, *segment_length) * side
            nx = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
            ny = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
            trial = img.copy()
            _draw_segment(trial, (x, y), (nx, ny), brush)
            trial_cover = float((np.asarray(trial) > 0).mean())
            if trial_cover > max_cover:
                break  # too much: drop this segment, start a new stroke
            img, cover, x, y = trial, trial_cover, nx, ny
            if cover >= target or tries >= max_tries:
                break
    if cover < min_cover:
        return random_box_mask(height, width, generator, min_cover, max_cover)
    return torch.from_numpy((np.asarray(img) > 0).astype(np.float32))


@dataclass
class MaskSampler:
    """Draw one inpainting mask per sample: an entity mask, a random box or brush strokes.

    The kind is drawn with probabilities proportional to `entity`, `box` and `stroke`; for a
    sample without entity masks (a data set without them, or an image with none) the entity
    weight is dropped and the other two renormalised. An entity mask is one entity drawn
    uniformly, or with probability `entity_union` (when the image has >= 2 entities) the union of
    a random subset of 2..K of them. Only entities covering at least `entity_min_cover` of the
    image count; a sample with none is treated as one without entity masks.

    Args:
        entity, box, stroke: relative weights (>= 0) of the three kinds.
        entity_union: probability of a union of several entities (given an entity mask).
        entity_min_cover: smaller entities are never chosen (e.g. tiny COCO instances).
        min_cover, max_cover: coverage bounds of the random masks (entity masks are as they are).
    """

    entity: float = 0.5
    box: float = 0.25
    stroke: float = 0.25
    entity_union: float = 0.0
    entity_min_cover: float = 0.0
    min_cover: float = 0.1
    max_cover: float = 0.5

    def __post_init__(self) -> None:
        weights = (self.entity, self.box, self.stroke)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"mask weights must be >= 0 and not all 0, got {weights}")
        if not 0.0 <= self.entity_union <= 1.0:
            raise ValueError(f"entity_union must be in [0, 1], got {self.entity_union}")
        _check_cover(self.min_cover, self.max_cover)

    def kind_probs(self, has_entities: bool) -> dict[str, float]:
        """The probability of each kind for a sample with or without entity masks."""
        weights = {"entity": self.entity if has_entities else 0.0, "box": self.box}
        weights["stroke"] = self.stroke
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(
                "a sample has no entity masks and the box and stroke weights are 0: give the "
                "random masks some weight (model.masks.box / model.masks.stroke)"
            )
        return {k: w / total for k, w in weights.items()}

    def random_mask(self, kind: str, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        fn = random_box_mask if kind == "box" else random_stroke_mask
        return fn(*size, generator, min_cover=self.min_cover, max_cover=self.max_cover)

    def usable_entities(self, masks: Tensor | None, size: tuple[int, int]) -> Tensor | None:
        """The binary (K', H, W) masks of the entities large enough to be chosen, or None."""
        return self._usable(masks, size)[0]

    def _usable(self, masks: Tensor | None, size: tuple[int, int]) -> tuple[Tensor | None, Tensor]:
        """`usable_entities` and the (K',) indices of those entities in `masks`."""
        if masks is None or masks.shape[0] == 0:
            return None, torch.zeros(0, dtype=torch.long)
        masks = (masks.detach().float().cpu() >= 0.5).float()  # (K, H', W')
        if tuple(masks.shape[-2:]) != tuple(size):
            masks = F.interpolate(masks[None], size=size)[0]  # nearest: (K, H, W)
        cover = masks.flatten(1).mean(1)  # (K,)
        keep = ((cover > 0) & (cover >= self.entity_min_cover)).nonzero()[:, 0]  # (K',)
        return (masks[keep], keep) if keep.numel() else (None, keep)

    def entity_mask(self, masks: Tensor, generator: torch.Generator) -> Tensor:
        """One entity or the union of several from the usable `masks` (K, H, W) -> (H, W)."""
        return masks[self._entity_choice(masks.shape[0], generator)].amax(0)  # (H, W)

    def _entity_choice(self, k: int, generator: torch.Generator) -> Tensor:
        """Which of `k` usable entities an entity mask covers: one, or 2..k (`entity_union`)."""
        if k >= 2 and float(torch.rand((), generator=generator)) < self.entity_union:
            n = _randint(generator, 2, k)
            return torch.randperm(k, generator=generator)[:n]
        return torch.tensor([_randint(generator, 0, k - 1)])

    def sample_one(
        self, size: tuple[int, int], generator: torch.Generator, entity_masks: Tensor | None = None
    ) -> tuple[Tensor, str, list[int]]:
        """-> one mask (H, W) float {0, 1}, its kind, and the indices in `entity_masks` of the
        entities it covers (empty for a random mask)."""
        ents, index = self._usable(entity_masks, size)
        probs = self.kind_probs(ents is not None)
        u, kind = float(torch.rand((), generator=generator)), "stroke"
        for name in MASK_KINDS:
            if u < probs[name]:
                kind = name
                break
            u -= probs[name]
        if kind != "entity":
            return self.random_mask(kind, size, generator), kind, []
        chosen = self._entity_choice(ents.shape[0], generator)
        return ents[chosen].amax(0), kind, index[chosen].tolist()

    def sample(
        self,
        batch_size: int,
        size: tuple[int, int],
        generator: torch.Generator,
        entity_masks: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, list[str]]:
        """-> masks (B, 1, H, W) float {0, 1} on the CPU and the kind of each.

        `entity_masks`: per sample a (K, H', W') {0, 1} tensor (K may be 0) or None; resized
        (nearest) to `size` if needed.
        """
        if entity_masks is not None and len(entity_masks) != batch_size:
            raise ValueError(f"{len(entity_masks)} entity mask sets for {batch_size} samples")
        out, kinds = torch.zeros(batch_size, 1, *size), []  # (B, 1, H, W)
        for i in range(batch_size):
            out[i, 0], kind, _ = self.sample_one(
                size, generator, entity_masks[i] if entity_masks else None
            )
            kinds.append(kind)
        return out, kinds


class InpaintMaskDataset(Dataset):
    """`base`'s samples plus ``inpaint_mask`` (1, H, W) float {0, 1} and ``mask_kind``, drawn by
    a `MaskSampler(**sampler_kwargs)` from the sample's ``entity_masks`` (where it has them).

    The draw runs where the sample is loaded (the DataLoader workers): its generator is seeded
    from the process's torch RNG, which Lightning seeds per worker (`seed_everything(seed,
    workers=True)`), so a run is repeatable for a given seed and worker count.
    `SemaniDiffModule` uses a batch's ``inpaint_mask`` instead of drawing its own.

    Entity captions: when the mask covers exactly one entity, with probability
    `entity_captions` the sample's ``caption`` (and ``tokens``) becomes
    ``caption_template.format(word=...)`` with that entity in words, and ``entity_caption`` is
    True. The words are ``base.entity_phrase(index, k, generator)`` where the data set has it
    (ShapesWorld: "a little red circle" or "a red circle", phrased as its captions are), else
    the entity's name with its article ("an elephant"). The image-level caption describes every
    entity, and the model must guess which one the mask hides; an editor is asked for the
    masked entity alone.
    """

    def __init__(
        self,
        base: Dataset,
        entity_captions: float = 0.0,
        caption_template: str = "{word}",
        **sampler_kwargs: float,
    ) -> None:
        if not 0.0 <= entity_captions <= 1.0:
            raise ValueError(f"entity_captions must be in [0, 1], got {entity_captions}")
        if "{word}" not in caption_template:
            raise ValueError(f"caption_template must contain '{{word}}', got {caption_template!r}")
        self.base = base
        self.sampler = MaskSampler(**sampler_kwargs)
        self.entity_captions = float(entity_captions)
        self.caption_template = caption_template

    def __len__(self) -> int:
        return len(self.base)

    def entity_words(self, sample: dict, k: int, generator: torch.Generator) -> str:
        """Entity `k` of `sample` in words, with its article (see the class docstring)."""
        phrase = getattr(self.base, "entity_phrase", None)
        if phrase is not None:
            return phrase(int(sample["index"]), k, generator)
        return with_article(sample["entity_names"][k])

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        size = tuple(sample["image"].shape[-2:])
        mask, kind, chosen = self.sampler.sample_one(size, generator, sample.get("entity_masks"))
        out = {**sample, "inpaint_mask": mask[None], "mask_kind": kind}  # (1, H, W)
        coin = float(torch.rand((), generator=generator))  # drawn always: a fixed RNG order
        out["entity_caption"] = len(chosen) == 1 and coin < self.entity_captions
        if out["entity_caption"]:
            words = self.entity_words(sample, chosen[0], generator)
            out["caption"] = self.caption_template.format(word=words)
            tokenizer = getattr(self.base, "tokenizer", None)
            if tokenizer is not None and "tokens" in sample:
                out["tokens"] = tokenizer([out["caption"]])[0]  # (L,)
        return out
