"""`python manipulate.py`: edit the entities of one image with words (configs/manipulate.yaml).

    python manipulate.py editor=semani_diff editor.source=<diffusers inpainting folder> \
        image=photo.jpg entity=bird text="a blue bird" out=edits/

1. **Read** `image` with `semani.utils.image_io.read_image` (EXIF orientation applied,
   transparency composited on white, 16-bit scaled to 8); every output has its size.
2. **Plan** the edits: `entity=bird text="a blue bird"` is one edit; without `entity`,
   `text="bird: a blue bird | branch: a snowy branch"` is several (`parse_entity_edits`);
   with `mask=` (white = edit, any size, resized nearest) `text` is one plain text and the
   alignment phase is skipped.
3. **Editor**: `hydra.utils.instantiate(cfg.editor)` (`configs/editor/`): `DiffEditor`,
   `BlendedLatentEditor` or `TransPixelEditor` (below); each has
   `edit(image, mask, text, seed=) -> [PIL image]`.
4. **Align** (no `mask=`): `EntityAligner.align_many` on the input image, with the SeMani-Trans
   token grid where there is one. Every entity is found on the *input* before any edit, so a
   word that is not found stops the run before anything is generated, and an edit cannot hide
   a later entity. Every proposal's similarity is logged, and which were chosen.
5. **Edit** the entities one after another, in the order of `text`, each starting from the
   previous result (the running image) and with the same `seed`.
6. **Write** into `out`, each to a temporary name then renamed (`semani.utils.atomic`: a crash
   leaves no half file): `edited.png`, `mask.png` (the union of the edited masks, 0/255) and
   `overlay.png` (the input with that mask tinted red).

Steps 2-5 are functions (`plan_edits`, `build_editor`, `build_aligner`, `align_edits`,
`apply_edits`) that the Gradio app (`python -m semani.app`) reuses.

`main(cfg)` turns the expected failures (unreadable image, missing model or weights, missing
required key, entity not found, unparsable text, a mask too small) into one line on stderr and
exit status 1 (the traceback is logged at debug level: `hydra.verbose=true`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from semani.alignment.aligner import EntityAligner, EntityEdit, parse_entity_edits
from semani.alignment.segmenters import build_segmenter
from semani.alignment.types import EntityNotFoundError, EntityProposals
from semani.data.transforms import image_to_tensor
from semani.manipulation.diff_editor import (
    composite,
    feather_weights,
    prepare_inputs,
    resize_bilinear,
)
from semani.utils.atomic import save_image
from semani.utils.checkpoint import CheckpointMismatchError
from semani.utils.image_io import read_image, read_mask
from semani.utils.masks import mask_to_token_mask
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import extras

log = get_pylogger(__name__)

__all__ = [
    "TransPixelEditor",
    "align_edits",
    "apply_edits",
    "build_aligner",
    "build_editor",
    "instantiate_unwrapped",
    "main",
    "manipulate",
    "one_line",
    "overlay",
    "plan_edits",
]

OUTPUTS = ("edited.png", "mask.png", "overlay.png")
TINT, TINT_ALPHA = (255, 0, 0), 0.5  # overlay.png: the mask in half-transparent red


# ---------------------------------------------------------------------------------------------
# SeMani-Trans in pixel space


class TransPixelEditor:
    """`TransEditor` on images of any size, with the input kept outside the mask.

    The image is resized (bilinear, antialiased) to the model's training size, the pixel mask
    becomes a token mask on the VQGAN grid (`mask_to_token_mask`: bilinear, > 0), the tokens
    inside it are re-sampled, the decoded image is resized back and composited into the input
    with `feather_weights(mask, feather)`: every pixel outside the mask is the input's.

    Args:
        model: a `SemaniTransModule` (`gpt`, `vqgan`), e.g. from `semani.load_model`.
        filter_thres, temperature: top-k sampling (see `TransEditor`).
        gray_guidance: condition on the grayscale image's tokens (keeps the entity's shape).
        image_size: the model's input (H, W) or side; None: sqrt(image_len) tokens per side
            times the VQGAN's downsampling factor.
        feather: seam width in pixels inside the mask, at the input size.
        min_tokens: refuse (`MaskTooSmallError`) masks covering fewer token cells.
        device: where the model runs (None: where it is).
    """

    def __init__(
        self,
        model: Any,
        filter_thres: float = 0.99,
        temperature: float = 1.0,
        gray_guidance: bool = True,
        image_size: int | Sequence[int] | None = None,
        feather: float = 4,
        min_tokens: int = 1,
        device: str | torch.device | None = None,
    ) -> None:
        from semani.data.tokenizer import TextTokenizer
        from semani.manipulation.trans import TransEditor

        if device is not None:
            model = model.to(device)
        gpt, vqgan = model.gpt, model.vqgan
        factor = int(vqgan.downsample_factor)
        image_len = int(gpt.config.image_len)
        if image_size is None:
            side = math.isqrt(image_len)
            if side * side != image_len:
                raise ValueError(
                    f"image_len={image_len} is not a square grid: pass editor.image_size=[h, w]"
                )
            image_size = (side * factor, side * factor)
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.token_grid = (self.image_size[0] // factor, self.image_size[1] // factor)
        if self.token_grid[0] * self.token_grid[1] != image_len:
            raise ValueError(
                f"image_size {self.image_size} gives a {self.token_grid} token grid, but the "
                f"transformer expects image_len={image_len} tokens"
            )
        self.editor = TransEditor(
            gpt,
            vqgan,
            TextTokenizer(gpt.config.text_len),
            filter_thres=filter_thres,
            temperature=temperature,
        )
        self.gray_guidance, self.feather, self.min_tokens = gray_guidance, feather, min_tokens

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | os.PathLike, device: str | torch.device | None = None, **kwargs: Any
    ) -> TransPixelEditor:
        """An editor from a SeMani-Trans checkpoint (`semani.load_model`, eval mode)."""
        import semani

        model = semani.load_model(ckpt, device=device)
        if not (hasattr(model, "gpt") and hasattr(model, "vqgan")):
            raise CheckpointMismatchError(
                f"'{ckpt}' holds a {type(model).__name__}, not a SeMani-Trans model"
            )
        log.info("SeMani-Trans editor from %s", ckpt)
        return cls(model, device=device, **kwargs)

    def edit(self, image: Any, mask: Any, text: str, seed: int | None = None) -> list[Any]:
        """Re-sample the masked entity of `image` after `text`; inputs and output as
        `DiffEditor.edit` (one image)."""
        src, pixel_mask, pixels, _ = prepare_inputs(image, mask, factor=1)  # (1,1,H,W), (1,3,H,W)
        H, W = src.original.shape[-2:]
        x = resize_bilinear(pixels, self.image_size).clamp(-1, 1)  # (1, 3, h, w)
        token_mask = mask_to_token_mask(
            pixel_mask[0, 0], self.token_grid, min_tokens=self.min_tokens
        )  # (gh, gw) bool
        out = self.editor.edit(x[0], token_mask, text, self.gray_guidance, seed)  # (3, h, w)
        out = ((out.float().cpu() + 1) / 2).clamp(0, 1)[None]  # (1, 3, h, w) in [0, 1]
        edited = resize_bilinear(out, (H, W)).clamp(0, 1)  # (1, 3, H, W)
        return composite(src, edited, feather_weights(pixel_mask[0, 0], self.feather))

    __call__ = edit


# ---------------------------------------------------------------------------------------------
# steps


def plan_edits(text: str, entity: str | None, has_mask: bool) -> list[tuple[str | None, str]]:
    """(word, text) pairs in editing order; the word is None for a given mask."""
    text = str(text).strip()
    if not text:
        raise ValueError('text is empty: pass text="a blue bird" (or "bird: a blue bird")')
    if has_mask:
        if entity:
            log.info("mask= given: entity=%s is not used (no alignment)", entity)
        return [(None, text)]
    if entity:
        return [(str(entity).strip(), text)]
    if ":" not in text:
        raise ValueError(
            f"which entity? text={text!r} names none: pass entity=<word>, a mask=<file>, or "
            'text="word: description | word: description"'
        )
    return list(parse_entity_edits(text))


def instantiate_unwrapped(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(cfg, **kwargs)`, but a failing constructor raises its own error
    (e.g. `FileNotFoundError` for missing weights, `ValueError` for a bad option) instead of
    Hydra's `InstantiationException` wrapper, so `main` can print it as one line (`one_line`)
    and callers can catch it by type (`USER_ERRORS`)."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def build_editor(cfg: DictConfig) -> Any:
    """The editor of `cfg.editor` (`configs/editor/`; its constructor's own errors)."""
    editor = instantiate_unwrapped(cfg)
    log.info("editor: %s", type(editor).__name__)
    return editor


def build_aligner(cfg: DictConfig) -> EntityAligner:
    """The aligner of `cfg.alignment` (segmenter via `build_segmenter`: its own errors)."""
    aligner = instantiate_unwrapped(cfg, segmenter=None)
    aligner.segmenter = build_segmenter(cfg.segmenter)
    return aligner


def log_alignment(edit: EntityEdit) -> None:
    """Every proposal of one entity with its similarity (best first), and which were chosen."""
    res = edit.result
    props = res.proposals
    area = props.masks.flatten(1).float().mean(1).tolist() if len(props) else []
    rule = res.extras.get("selection"), res.extras.get("threshold")
    log.info("entity %r -> %r: %d proposals (selection %s, threshold %s)",
             edit.word, edit.text, len(props), *rule)  # fmt: skip
    for i, sim in res.ranking():
        mark = "  <- chosen" if i in res.chosen else ""
        log.info("  proposal #%d: similarity %s, area %.1f%%, segmenter score %.3f%s",
                 i, "n/a" if sim != sim else f"{sim:.3f}", 100 * area[i],
                 float(props.scores[i]), mark)  # fmt: skip
    log.info("  chosen: %s", ", ".join(f"#{i}" for i in res.chosen))


def align_edits(
    aligner: EntityAligner,
    image: Image.Image,
    plan: Sequence[tuple[str, str]],
    token_grid: tuple[int, int] | None = None,
    proposals: EntityProposals | None = None,
) -> list[EntityEdit]:
    """Align every (word, text) of `plan` on the RGB `image` (`EntityAligner.align_many`, with
    the segmenter's proposals unless given) and log every proposal's similarity.

    Raises:
        EntityNotFoundError: a word no proposal matches.
    """
    with torch.inference_mode():
        edits = aligner.align_many(image_to_tensor(image), plan, token_grid, proposals)
    for e in edits:
        log_alignment(e)
    return edits


def apply_edits(
    editor: Any,
    image: Image.Image,
    plan: Sequence[tuple[str | None, str]],
    masks: Sequence[np.ndarray],
    seed: int | None = None,
    **sampler: Any,
) -> Image.Image:
    """Edit the entities one after another, in the order of `plan`, each starting from the
    previous result and with the same `seed`; `sampler` goes to `editor.edit` (e.g. `steps=`,
    `guidance_scale=` for the diffusion editors)."""
    running = image
    for i, ((word, text), mask) in enumerate(zip(plan, masks)):
        log.info("edit %d/%d: %s -> %r (%.1f%% of the image)", i + 1, len(plan),
                 word or "mask", text, 100 * mask.mean())  # fmt: skip
        running = editor.edit(running, mask, text, seed=seed, **sampler)[0]
    return running


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """`image` with `mask` (H, W) bool tinted (`TINT` at `TINT_ALPHA`)."""
    arr = np.asarray(image).astype(np.float32)  # (H, W, 3)
    tint = np.asarray(TINT, np.float32)
    arr[mask] = arr[mask] * (1 - TINT_ALPHA) + tint * TINT_ALPHA
    return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))


def _check_required(cfg: DictConfig) -> None:
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        hints = {"editor.ckpt": "<SeMani-Trans checkpoint>", "image": "<file>",
                 "text": "\"a blue bird\""}  # fmt: skip
        given = " ".join(f"{k}={hints.get(k, '...')}" for k in missing)
        raise ValueError(f"missing required {', '.join(missing)}: pass {given}")


# ---------------------------------------------------------------------------------------------
# the task


def manipulate(cfg: DictConfig) -> dict[str, Any]:
    """Run the edit described by `cfg` (see the module docstring); return the output paths and,
    per edit, the word, text, chosen proposals and all similarities."""
    _check_required(cfg)
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg.seed))  # untrained parts (tests), torch's default sampling
    image = read_image(cfg.image)
    W, H = image.size
    log.info("input %s: %dx%d (W x H)", cfg.image, W, H)
    user_mask = read_mask(cfg.mask, (H, W)) if cfg.get("mask") else None
    if user_mask is not None and not user_mask.any():
        raise ValueError(f"mask {cfg.mask} has no white pixel: nothing to edit")
    plan = plan_edits(cfg.text, cfg.get("entity"), user_mask is not None)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)

    editor = build_editor(cfg.editor)
    if user_mask is not None:
        masks = [user_mask]
        report = [{"word": None, "text": plan[0][1], "chosen": [], "similarities": []}]
    else:
        aligner = build_aligner(cfg.alignment)
        edits = align_edits(aligner, image, plan, getattr(editor, "token_grid", None))
        masks = [e.result.mask.cpu().numpy() for e in edits]
        report = [
            {"word": e.word, "text": e.text, "chosen": list(e.result.chosen),
             "similarities": e.result.similarities.tolist()}
            for e in edits
        ]  # fmt: skip

    running = apply_edits(editor, image, plan, masks, seed=cfg.get("seed"))

    union = np.logical_or.reduce(masks)  # (H, W) bool
    paths = {name: out / name for name in OUTPUTS}
    save_image(paths["edited.png"], running)
    save_image(paths["mask.png"], Image.fromarray(union.astype(np.uint8) * 255, "L"))
    save_image(paths["overlay.png"], overlay(image, union))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return {"outputs": {k: str(v) for k, v in paths.items()}, "edits": report}


# the failures a user can fix: one line, no traceback
USER_ERRORS = (OSError, ImportError, ValueError, CheckpointMismatchError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of `manipulate.py`: `manipulate(cfg)`; expected failures exit with status 1
    and one line on stderr (an entity not found also logs every proposal's similarity)."""
    try:
        extras(cfg)
        return manipulate(cfg)
    except EntityNotFoundError as err:
        log.info("no match for %r; every proposal, best first:", err.word)
        for i, sim in err.ranking:
            log.info("  proposal #%d: similarity %s", i, "n/a" if sim != sim else f"{sim:.3f}")
        raise SystemExit(f"error: {one_line(err)}") from None
    except USER_ERRORS as err:
        log.debug("manipulate failed", exc_info=True)
        raise SystemExit(f"error: {one_line(err)}") from None
