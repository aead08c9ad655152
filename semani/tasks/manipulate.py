"""`python manipulate.py`: edit the entities of one image with words (configs/manipulate.yaml).

    python manipulate.py method=semani_diff editor.source=<diffusers inpainting folder> \\
        image=photo.jpg entity=bird text="a blue bird" out=edits/

The task reads the input, calls `semani.EntityEditPipeline` (built from the `editor` and
`alignment` groups: plan, align, edit; see `semani.pipeline`) and writes the files:

1. **Read** `image` with `semani.utils.image_io.read_image` (EXIF orientation applied,
   transparency composited on white, 16-bit scaled to 8) and `mask=` (white = edit, any size,
   resized nearest) when given; every output has the input's size.
2. **Edit** with the pipeline: `entity=bird text="a blue bird"`, or several edits
   `text="bird: a blue bird | branch: a snowy branch"`, or `mask=` and a plain text (no
   alignment). Every proposal's similarity is logged, and which were chosen, before any edit;
   `select=best|all|<k>` picks the rule's choice, every proposal at or above the threshold,
   or the k-th best (`alignment.pick`).
3. **Write** into `out` (checked writable before any model is built; created only now) as one
   set, each to a temporary name, renamed when all three are complete (`semani.utils.atomic`:
   a crash leaves no half file): `edited.png`, `mask.png` (the union of the edited masks,
   0/255) and `overlay.png` (the input with that mask tinted red).

`main(cfg)` turns the expected failures (unreadable image, missing model or weights, missing
required key, entity not found, unparsable text, a mask too small) into one line on stderr and
exit status 1 (the traceback is logged at debug level: `hydra.verbose=true`).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from semani.alignment.types import EntityNotFoundError
from semani.pipeline import EditResult, EntityEditPipeline
from semani.utils.atomic import atomic_path
from semani.utils.errors import one_line_errors
from semani.utils.image_io import read_image, read_mask
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import exit_on_sigterm, extras
from semani.utils.weights import check_weights

log = get_pylogger(__name__)

__all__ = ["OUTPUTS", "main", "manipulate", "write_outputs"]

OUTPUTS = ("edited.png", "mask.png", "overlay.png")


def _check_required(cfg: DictConfig) -> None:
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        hints = {"editor.ckpt": "<SeMani-Trans checkpoint>", "image": "<file>",
                 "text": "\"a blue bird\""}  # fmt: skip
        given = " ".join(f"{k}={hints.get(k, '...')}" for k in missing)
        raise ValueError(f"missing required {', '.join(missing)}: pass {given}")


def check_writable(out: Path) -> None:
    """`OSError` now, before any model is built, when `out` cannot be made or written (it is
    a file, or under one, or its nearest existing folder is read-only); nothing is created."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"cannot write into out={out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into out={out}: {probe} is not writable")


def write_outputs(out: Path, result: EditResult) -> dict[str, Path]:
    """`OUTPUTS` of `result` into `out` as one set: all three are written to temporary names
    first and renamed only when every one is complete (a failure leaves none of them, and any
    earlier outputs in `out` untouched)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUTS}
    images = {"edited.png": result.image, "mask.png": result.mask_image(),
              "overlay.png": result.overlay()}  # fmt: skip
    with ExitStack() as stack:
        tmps = {name: stack.enter_context(atomic_path(paths[name])) for name in OUTPUTS}
        for name in OUTPUTS:
            images[name].save(tmps[name], format="PNG")
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def manipulate(cfg: DictConfig) -> dict[str, Any]:
    """Run the edit described by `cfg` (see the module docstring); return the output paths and,
    per edit, the word, text, chosen proposals and all similarities."""
    _check_required(cfg)
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg.seed))  # untrained parts (tests), torch's default sampling
    image = read_image(cfg.image)
    W, H = image.size
    log.info("input %s: %dx%d (W x H)", cfg.image, W, H)
    mask = read_mask(cfg.mask, (H, W)) if cfg.get("mask") else None
    if mask is not None and not mask.any():
        raise ValueError(f"mask {cfg.mask} has no white pixel: nothing to edit")
    out = Path(str(cfg.out))
    check_writable(out)
    check_weights(cfg, skip=("alignment.",) if mask is not None else ())
    pipe = EntityEditPipeline.from_config(cfg, align=mask is None)
    pipe.log_ranking = True  # the ranked proposals before any edit
    result = pipe(image, cfg.text, entity=cfg.get("entity"), mask=mask, seed=cfg.get("seed"))
    if mask is not None:
        log.info("%s", result.edits[0].describe()[0])
    paths = write_outputs(out, result)
    return {
        "outputs": {k: str(v) for k, v in paths.items()},
        "edits": [step.report() for step in result.edits],
    }


def _log_ranking(err: BaseException) -> None:
    if isinstance(err, EntityNotFoundError):
        log.info("no match for %r; every proposal, best first:", err.word)
        for i, sim in err.ranking:
            log.info("  proposal #%d: similarity %s", i, "n/a" if sim != sim else f"{sim:.3f}")


@one_line_errors(EntityNotFoundError, on_error=_log_ranking)
def main(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of `manipulate.py`: `manipulate(cfg)`; expected failures exit with status 1
    and one line on stderr (an entity not found also logs every proposal's similarity)."""
    exit_on_sigterm()
    extras(cfg)
    return manipulate(cfg)
