"""`load_model`: open any of the project's checkpoints, from anywhere, in eval mode.

A checkpoint names the class that wrote it (the `semani_model` entry that `on_save_checkpoint`
writes with `semani.utils.checkpoint.name_checkpoint`); older ones are recognised by their
hyper-parameters. `load_model` reads the file weights-only, imports that class (only names
inside `semani`) and calls its class method `from_checkpoint_dict(checkpoint, source,
**overrides)`, which rebuilds the model, loads its weights strictly and checks the load-time
overrides (a moved frozen file, ...). No model module is imported until a checkpoint names it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from semani.utils.checkpoint import MODEL_KEY, CheckpointMismatchError, load_checkpoint

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

__all__ = ["load_model", "model_class", "model_class_name"]

TRANS = "semani.models.semani_trans.SemaniTransModule"
VQGAN = "semani.models.vqgan.VQGANModule"
_OURS = re.compile(r"semani(\.[A-Za-z_]\w*)+")  # a dotted name inside the semani package


def model_class_name(ckpt: Mapping[str, Any], source: str) -> str:
    """The class a checkpoint belongs to: its `semani_model` entry, else from its hparams."""
    name = ckpt.get(MODEL_KEY)
    if isinstance(name, str):
        return name
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and "gpt" in hp:
        return TRANS
    if isinstance(hp, Mapping) and "ddconfig" in hp:
        return VQGAN
    sd = ckpt.get("state_dict")
    if isinstance(sd, Mapping) and any(str(k).startswith("encoder.") for k in sd):
        return VQGAN  # an official taming VQGAN (needs config=)
    raise CheckpointMismatchError(
        f"'{source}' is not a checkpoint of ours: it names no model class ('{MODEL_KEY}') and "
        f"its hyper-parameters are none of SeMani-Trans ('gpt') or VQGAN ('ddconfig'); "
        f"top-level keys: {sorted(map(str, ckpt))[:8]}"
    )


def model_class(name: str, source: str) -> type:
    """The class `name` (`module.Class`) that wrote checkpoint `source`, imported.

    Raises:
        CheckpointMismatchError: `name` is outside `semani`, does not exist, or is no class with
            a `from_checkpoint_dict` class method.
    """
    module_name, _, attr = name.rpartition(".")
    cls, why = None, "load_model only opens classes inside the semani package"
    if _OURS.fullmatch(name):
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
            why = f"module {module_name} has no class {attr}"
        except ModuleNotFoundError as err:
            if err.name is None or not (module_name + ".").startswith(err.name + "."):
                raise  # the module exists but lacks a dependency: say so, not "no such class"
            why = f"there is no module {module_name}"
    if isinstance(cls, type):
        if callable(getattr(cls, "from_checkpoint_dict", None)):
            return cls
        why = f"{attr} has no from_checkpoint_dict class method"
    raise CheckpointMismatchError(
        f"'{source}' was written by {name!r}, which load_model cannot open: {why}"
    )


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, **overrides: Any
) -> pl.LightningModule:
    """Open one of our checkpoints (VQGAN, SeMani-Trans, ...) and return it in eval mode.

    Args:
        path: a Lightning checkpoint written by `train.py` (or an official taming VQGAN
            checkpoint with `config=<its model.yaml>`).
        device: where to put the model (default: stays on the CPU).
        **overrides: passed to the class's `from_checkpoint_dict`. SeMani-Trans: any
            constructor argument; `vqgan={"ckpt_path": new}` / `clip={"pretrained": new}` for
            moved frozen files, `accept_frozen_mismatch=True` to use frozen weights that differ
            from the training ones. VQGAN: `with_loss=True` keeps the discriminator/LPIPS
            weights. The others: constructor arguments.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: not one of our checkpoints, or its weights do not fit.
    """
    source = str(path)
    ckpt = load_checkpoint(path)
    cls = model_class(model_class_name(ckpt, source), source)
    model = cls.from_checkpoint_dict(ckpt, source, **overrides)
    if device is not None:
        model = model.to(device)
    log.info("load_model: %s from %s", type(model).__name__, source)
    return model.eval()
