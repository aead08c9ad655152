"""`load_model`: open any of the project's checkpoints, from anywhere, in eval mode.

A checkpoint names the class that wrote it (the `semani_model` entry written by
`on_save_checkpoint`); older ones are recognised by their hyper-parameters. Each class has a
loader here that reads weights-only and strictly and accepts load-time overrides (a moved frozen
file, another device). Other model classes (e.g. `semani.models.clip_module.ClipTrainModule`)
add themselves with `register_model` when their module is imported; `load_model` imports the
module a checkpoint names (only inside `semani`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from semani.utils.checkpoint import (
    CheckpointMismatchError,
    get_state_dict,
    load_checkpoint,
    load_state_dict_strict,
)

log = logging.getLogger(__name__)

__all__ = [
    "check_overrides",
    "export_dir",
    "load_model",
    "model_class_name",
    "name_checkpoint",
    "rebuild_strict",
    "register_model",
    "register_simple_model",
]

MODEL_KEY = "semani_model"  # the checkpoint entry naming the class that wrote it
TRANS = "semani.models.semani_trans.SemaniTransModule"
VQGAN = "semani.models.vqgan.VQGANModule"

# class name -> loader(checkpoint dict, source path, **overrides) -> module
Loader = Callable[..., pl.LightningModule]
_LOADERS: dict[str, Loader] = {}


def check_overrides(cls: type, overrides: Mapping[str, Any]) -> None:
    """TypeError naming the load-time overrides that are no constructor argument of `cls`."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} overrides {unknown}; known: {sorted(known)}")


def name_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Write the class that `load_model` must use into `checkpoint` (call it from
    `on_save_checkpoint`)."""
    checkpoint[MODEL_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"


def export_dir(module: pl.LightningModule) -> Path | None:
    """`<run>/<hparams.export_dir>` where a finished fit writes its export, or None when there
    is nothing to write (no `export_dir`, a fast_dev_run, or not the global-zero process)."""
    trainer = module.trainer
    folder = module.hparams.get("export_dir")
    if not folder or trainer.fast_dev_run or not trainer.is_global_zero:
        return None
    return Path(trainer.default_root_dir) / folder


def rebuild_strict(
    cls: type[pl.LightningModule],
    checkpoint: Mapping[str, Any],
    source: str,
    marker: str,
    **overrides: Any,
) -> pl.LightningModule:
    """A checkpoint already read -> `cls(**its hyper-parameters, **overrides)` with its weights
    loaded strictly. `marker`: a hyper-parameter every checkpoint of `cls` has (anything else is
    a `CheckpointMismatchError` naming the file)."""
    hp = checkpoint.get("hyper_parameters")
    if not isinstance(hp, Mapping) or marker not in hp:
        raise CheckpointMismatchError(
            f"checkpoint '{source}' is not a {cls.__name__} checkpoint (its hyper_parameters "
            f"have no {marker!r})"
        )
    check_overrides(cls, overrides)
    model = cls(**{**dict(hp), **overrides})
    state = get_state_dict(checkpoint, source)
    load_state_dict_strict(model, state, source, expected=f"a {cls.__name__}")
    return model


def register_simple_model(cls: type[pl.LightningModule], marker: str) -> None:
    """Make `load_model` open `cls`'s checkpoints with `rebuild_strict(cls, ..., marker)`."""

    def loader(ckpt: dict[str, Any], source: str, **overrides: Any) -> pl.LightningModule:
        return rebuild_strict(cls, ckpt, source, marker, **overrides)

    register_model(f"{cls.__module__}.{cls.__qualname__}", loader)


def register_model(name: str, loader: Loader) -> None:
    """Make `load_model` open checkpoints whose `semani_model` entry is `name`."""
    _LOADERS[name] = loader


def _load_trans(ckpt: dict[str, Any], source: str, **overrides: Any) -> pl.LightningModule:
    from semani.models.semani_trans import SemaniTransModule

    return SemaniTransModule.from_checkpoint_dict(ckpt, source, **overrides)


def _load_vqgan(ckpt: dict[str, Any], source: str, **overrides: Any) -> pl.LightningModule:
    from semani.models.vqgan import VQGANModule

    config = overrides.pop("config", None)
    if overrides.keys() - {"with_loss"}:
        raise TypeError(
            f"unknown VQGAN overrides {sorted(overrides.keys() - {'with_loss'})}; known: "
            "with_loss (and config=<taming model.yaml> for an official taming checkpoint)"
        )
    if config is not None:
        return VQGANModule.from_taming(source, config, **overrides)
    return VQGANModule.from_checkpoint(source, **overrides)


register_model(TRANS, _load_trans)
register_model(VQGAN, _load_vqgan)


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


def load_model(
    path: str | os.PathLike, device: str | torch.device | None = None, **overrides: Any
) -> pl.LightningModule:
    """Open one of our checkpoints (VQGAN, SeMani-Trans, ...) and return it in eval mode.

    Args:
        path: a Lightning checkpoint written by `train.py` (or an official taming VQGAN
            checkpoint with `config=<its model.yaml>`).
        device: where to put the model (default: stays on the CPU).
        **overrides: passed to the class's loader. SeMani-Trans: any constructor argument;
            `vqgan={"ckpt_path": new}` / `clip={"pretrained": new}` for moved frozen files,
            `accept_frozen_mismatch=True` to use frozen weights that differ from the training
            ones. VQGAN: `with_loss=True` keeps the discriminator/LPIPS weights.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatchError: not one of our checkpoints, or its weights do not fit.
    """
    source = str(path)
    ckpt = load_checkpoint(path)
    name = model_class_name(ckpt, source)
    if name not in _LOADERS and name.startswith("semani."):
        # a class of ours that registers itself when its module is imported
        importlib.import_module(name.rsplit(".", 1)[0])
    loader = _LOADERS.get(name)
    if loader is None:
        raise CheckpointMismatchError(
            f"'{source}' was written by {name}, which load_model cannot open; known: "
            f"{sorted(_LOADERS)}"
        )
    model = loader(ckpt, source, **overrides)
    if device is not None:
        model = model.to(device)
    log.info("load_model: %s from %s", type(model).__name__, source)
    return model.eval()
