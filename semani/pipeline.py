"""`EntityEditPipeline`: the paper's method as one object, align the entity, then regenerate it.

    from semani import EntityEditPipeline

    pipe = EntityEditPipeline.from_config(cfg)            # cfg.editor, cfg.alignment (Hydra)
    pipe = EntityEditPipeline(aligner, editor)            # or from the parts
    result = pipe(image, "a blue bird", entity="bird", seed=0)
    result.image, result.mask, result.edits[0].alignment.ranking()

One call, three steps:

1. **Plan** (`plan_edits`): `entity="bird", text="a blue bird"` is one edit; without `entity`,
   `text="bird: a blue bird | branch: a snowy branch"` is several; with `mask=` (white = edit)
   `text` is one plain text and the alignment phase is skipped.
2. **Align** (`align`): every word is found on the *input* image before anything is generated
   (`EntityAligner.align_many`, on the editor's token grid where it has one, so that proposals
   too small for it are not eligible; with ``region="entity"`` the editor counts them in its
   window instead, `alignment_grid`): a word that is not found stops the call with
   `EntityNotFoundError` (which carries every proposal and its similarity), and an edit cannot
   hide a later entity.
3. **Edit** the entities one after another, in the order of the text, each starting from the
   previous result and with the same `seed` (an editor with `edit_many`, SeMani-Trans, chains
   every chosen proposal in turn on its own tokens, as the authors do); every pixel outside
   the union of the masks is the input's (the editors' exact composite; Blended LDM without its
   `composite` re-decodes it).

The image is converted once: the aligner reads a (3, H, W) tensor in [-1, 1], the editor an RGB
PIL image, and the result is an RGB PIL image of the input's size (`EditResult`). `manipulate.py`
writes `EditResult`'s files, the Gradio app renders it, and Table I calls the pipeline per case.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from semani.alignment.aligner import EntityAligner, parse_entity_edits
from semani.alignment.types import AlignmentResult, EntityProposals
from semani.data.transforms import image_to_tensor, to_uint8
from semani.manipulation.editor import Editor, sampler_options
from semani.manipulation.pixels import as_mask, overlay
from semani.manipulation.region import alignment_grid

log = logging.getLogger(__name__)

__all__ = ["EditResult", "EditStep", "EntityEditPipeline", "plan_edits"]


def plan_edits(text: str, entity: str | None, has_mask: bool) -> list[tuple[str | None, str]]:
    """(word, text) pairs in editing order; the word is None for a given mask."""
    text = str(text).strip()
    if not text:
        raise ValueError('text is empty: pass text="a blue bird" (or "bird: a blue bird")')
    if has_mask:
        if entity:
            log.info("a mask is given: entity=%s is not used (no alignment)", entity)
        return [(None, text)]
    if entity:
        return [(str(entity).strip(), text)]
    if ":" not in text:
        raise ValueError(
            f"which entity? text={text!r} names none: pass entity=<word>, a mask=<file>, or "
            'text="word: description | word: description"'
        )
    return list(parse_entity_edits(text))


@dataclass
class EditStep:
    """One edit of a call: the word that named the entity (None: a mask was given), the text,
    the mask it edited ((H, W) bool at the input's size) and its alignment (None: given)."""

    word: str | None
    text: str
    mask: np.ndarray
    alignment: AlignmentResult | None = None

    def report(self) -> dict[str, Any]:
        """word, text, chosen proposals and every proposal's similarity (JSON-ready)."""
        res = self.alignment
        return {
            "word": self.word,
            "text": self.text,
            "chosen": list(res.chosen) if res is not None else [],
            "similarities": res.similarities.tolist() if res is not None else [],
        }

    def describe(self) -> list[str]:
        """Every proposal with its similarity (best first) and which were chosen, as lines."""
        res = self.alignment
        if res is None:
            return [f"mask given -> {self.text!r} ({100 * self.mask.mean():.1f}% of the image)"]
        props = res.proposals
        area = props.masks.flatten(1).float().mean(1).tolist() if len(props) else []
        rule = res.extras.get("selection"), res.extras.get("threshold")
        lines = [
            f"entity {self.word!r} -> {self.text!r}: {len(props)} proposals "
            f"(selection {rule[0]}, threshold {rule[1]})"
        ]
        for i, sim in res.ranking():
            mark = "  <- chosen" if i in res.chosen else ""
            lines.append(
                f"  proposal #{i}: similarity {'n/a' if sim != sim else f'{sim:.3f}'}, "
                f"area {100 * area[i]:.1f}%, segmenter score {float(props.scores[i]):.3f}{mark}"
            )
        lines.append("  chosen: " + ", ".join(f"#{i}" for i in res.chosen))
        return lines


@dataclass
class EditResult:
    """What one call made: the edited image and the input (RGB, the input's size), each edit
    with its mask and alignment, and the segmenter's proposals (None when masks were given)."""

    image: Image.Image
    input: Image.Image
    edits: list[EditStep] = field(default_factory=list)
    proposals: EntityProposals | None = None

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the union of the edited masks."""
        return np.logical_or.reduce([e.mask for e in self.edits])

    def mask_image(self) -> Image.Image:
        """The union mask as an 8-bit image (255 = edited)."""
        return Image.fromarray(self.mask.astype(np.uint8) * 255, "L")

    def overlay(self) -> Image.Image:
        """The input with the union mask tinted red."""
        return overlay(self.input, self.mask)


def _chain(steps: Sequence[EditStep]) -> list[tuple[np.ndarray, str]]:
    """(mask, text) per chosen proposal of every step, in order (a given mask: itself)."""
    out = []
    for step in steps:
        res = step.alignment
        if res is None or len(res.chosen) < 2:
            out.append((step.mask, step.text))
        else:
            out += [(res.proposals.masks[i].cpu().numpy(), step.text) for i in res.chosen]
    return out


def _as_inputs(image: Any) -> tuple[Image.Image, Tensor]:
    """The input once as the editors' RGB PIL image and the aligner's (3, H, W) tensor in
    [-1, 1]; a float tensor is read as [-1, 1] and kept as it is for the aligner."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        return rgb, image_to_tensor(rgb)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an array image must be (H, W, 3) uint8, got {image.shape}")
        rgb = Image.fromarray(image)
        return rgb, image_to_tensor(rgb)
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            rgb = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
            return rgb, image_to_tensor(rgb)
        rgb = Image.fromarray(to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy())
        return rgb, image.detach()
    raise TypeError(
        f"image must be a PIL image, an (H, W, 3) array or a tensor, not {type(image)}"
    )


class EntityEditPipeline:
    """Align the entity a word names, then regenerate it from a text (see the module docstring).

    Args:
        aligner: the alignment phase (`EntityAligner`); None: every call must give a `mask`.
        editor: any editor of the contract `semani.manipulation.editor.Editor`.
    """

    def __init__(self, aligner: EntityAligner | None, editor: Editor) -> None:
        if not isinstance(editor, Editor):
            raise TypeError(
                f"{type(editor).__name__} is not an editor: it needs edit(image, mask, text, "
                "seed=), token_grid and min_tokens (semani.manipulation.editor.Editor)"
            )
        self.aligner, self.editor = aligner, editor
        # log every proposal with its similarity, and the chosen ones, before any edit
        self.log_ranking = False

    @classmethod
    def from_config(cls, cfg: Any, align: bool = True) -> EntityEditPipeline:
        """The pipeline of a config with the `editor` and `alignment` groups (manipulate.py,
        the app, Table I). The editor is built first (a missing model is its own error), then
        the aligner unless `align` is false or the config has no `alignment`."""
        from semani.utils.instantiators import instantiate_unwrapped

        editor = instantiate_unwrapped(cfg.editor)
        log.info("editor: %s", type(editor).__name__)
        aligner = None
        if align and cfg.get("alignment") is not None:
            aligner = EntityAligner.from_config(cfg.alignment)
        return cls(aligner, editor)

    @property
    def sampler_options(self) -> tuple[str, ...]:
        """The sampler settings the editor takes per call (`steps`, `guidance_scale`)."""
        return sampler_options(self.editor)

    def propose(
        self, image: Any, sample: Mapping[str, Any] | None = None, word: str | None = None
    ) -> EntityProposals:
        """The segmenter's proposals for `image` (to show them, or to pass to several calls);
        `word` reaches a text-conditioned segmenter only (`text_conditioned`)."""
        if self.aligner is None:
            raise ValueError("this pipeline has no aligner: give a mask")
        with torch.inference_mode():
            return self.aligner.propose(_as_inputs(image)[1], sample, word=word)

    @property
    def text_conditioned(self) -> bool:
        """Whether the segmenter's proposals depend on the word (GroundingDINO + SAM): then
        proposals are made per word and cannot be shared by the words of one call."""
        segmenter = getattr(self.aligner, "segmenter", None)
        return bool(getattr(segmenter, "text_conditioned", False))

    def align(
        self,
        image: Any,
        plan: Sequence[tuple[str, str]],
        sample: Mapping[str, Any] | None = None,
        proposals: EntityProposals | None = None,
    ) -> list[EditStep]:
        """Find every (word, text) of `plan` on `image`, on the editor's token grid
        (`alignment_grid`).

        Raises:
            EntityNotFoundError: a word no proposal matches.
        """
        if self.aligner is None:
            raise ValueError("this pipeline has no aligner: give a mask (mask=...)")
        tensor = image if isinstance(image, Tensor) and image.is_floating_point() else None
        if tensor is None:
            tensor = _as_inputs(image)[1]
        with torch.inference_mode():
            found = self.aligner.align_many(
                tensor, plan, alignment_grid(self.editor), proposals, sample
            )
        return [EditStep(e.word, e.text, e.result.mask.cpu().numpy(), e.result) for e in found]

    def __call__(
        self,
        image: Any,
        text: str,
        entity: str | None = None,
        mask: Any = None,
        seed: int | None = 0,
        sample: Mapping[str, Any] | None = None,
        proposals: EntityProposals | None = None,
        **sampler: Any,
    ) -> EditResult:
        """Edit the entities of `image` after `text` (see the module docstring).

        Args:
            image: RGB PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor (uint8, or float in
                [-1, 1]); any size.
            text: the target text, or "word: text | word: text" without `entity`.
            entity: the word naming the entity to edit.
            mask: a mask of the image's size (white / True = edit) instead of the alignment.
            seed: the sampling seed, the same for every edit of the call.
            sample: the data set sample the image comes from (for the ground-truth segmenter).
            proposals: the segmenter's proposals, when already computed (`propose`).
            sampler: per-call editor settings (`steps=`, `guidance_scale=`; see
                `sampler_options`); None values are left out.

        Raises:
            EntityNotFoundError: a word no proposal matches (nothing is generated).
            ValueError: an empty text, a mask of another size or without a white pixel.
        """
        rgb, tensor = _as_inputs(image)
        plan = plan_edits(text, entity, has_mask=mask is not None)
        if mask is not None:
            given = as_mask(mask, (rgb.height, rgb.width))[0, 0].numpy() >= 0.5  # (H, W)
            if not given.any():
                raise ValueError("the mask has no white pixel: nothing to edit")
            steps = [EditStep(None, plan[0][1], given)]
        else:
            steps = self.align(tensor, plan, sample, proposals)
            proposals = steps[0].alignment.proposals
            if self.log_ranking:
                for step in steps:
                    for line in step.describe():
                        log.info("%s", line)
        options = {k: v for k, v in sampler.items() if v is not None}
        for i, step in enumerate(steps):
            log.info("edit %d/%d: %s -> %r (%.1f%% of the image)", i + 1, len(steps),
                     step.word or "mask", step.text, 100 * step.mask.mean())  # fmt: skip
        chain = _chain(steps)  # each chosen proposal in turn, as the authors edit them
        if len(chain) > 1 and hasattr(self.editor, "edit_many"):  # the chain on its own tokens
            masks, texts = zip(*chain)
            running = self.editor.edit_many(rgb, list(masks), list(texts), seed=seed, **options)[0]
        else:
            running = rgb
            for step in steps:
                running = self.editor.edit(running, step.mask, step.text, seed=seed, **options)[0]
        return EditResult(running.convert("RGB"), rgb, steps, proposals)
