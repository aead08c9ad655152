"""Safe checkpoint IO: weights-only unpickling and strict, readable state-dict loading.

Checkpoints are read with ``torch.load(..., weights_only=True)``: tensors, containers and
primitives only. Lightning-1.x checkpoints (e.g. the official taming-transformers VQGANs) also
reference a few Lightning classes as metadata (the ModelCheckpoint class is the key of their
``callbacks`` dict). Those exact names, and only those, are mapped to an inert stand-in class
through ``torch.serialization.safe_globals``; nothing from Lightning is imported or run. Any other
global makes the load fail with an error that names it.

The models' side of `semani.load_model` lives here too, so that a model module imports it without
importing the loader: `MODEL_KEY` / `name_checkpoint` (the class that wrote a checkpoint),
`rebuild_strict` and `check_overrides` (a `from_checkpoint_dict` in a few lines) and `export_dir`
(where a finished fit writes its export).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: modules/ import this file and never import Lightning
    import pytorch_lightning as pl

MODEL_KEY = "semani_model"  # the checkpoint entry naming the class that wrote it
M = TypeVar("M", bound=nn.Module)


def plain_hparams(obj: Any) -> Any:
    """Hydra/OmegaConf containers, dataclasses, mappings and lists -> plain dicts and lists,
    recursively: hyper-parameters saved in a checkpoint must load with `weights_only=True`."""
    if type(obj).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): plain_hparams(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [plain_hparams(v) for v in obj]
    return obj


log = logging.getLogger(__name__)


class LegacyLightningObject:
    """Inert stand-in for a Lightning-1.x class referenced by an old checkpoint.

    It accepts and ignores whatever the pickle passes, so unpickling it cannot run Lightning code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Exact pickle names (``module.qualname``) allowed in legacy Lightning checkpoints. Official
# taming checkpoints (PL 1.0) key their ``callbacks`` state by the ModelCheckpoint class itself.
LEGACY_LIGHTNING_GLOBALS: tuple[str, ...] = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint needs globals outside the weights-only allow-list; it was not loaded."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's state dict does not fit the model it is loaded into, or the file holds
    something else than a checkpoint."""


class UnreadableCheckpointError(OSError):
    """The checkpoint file is empty, truncated or corrupt (e.g. an interrupted save)."""


def _safe_globals() -> list[tuple[type, str]]:
    return [(LegacyLightningObject, name) for name in LEGACY_LIGHTNING_GLOBALS]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``torch.save`` file on the CPU with weights-only unpickling.

    Every failure names the file and what is wrong with it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnreadableCheckpointError: the file is empty, truncated or not a torch file.
        UnsafeCheckpointError: the pickle references a global that is not allowed (the message
            names it); no code from the file was run.
        CheckpointMismatchError: the file holds something else than a checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: '{path}' (resolved: '{path.resolve()}')")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableCheckpointError(
            f"checkpoint '{path}' is empty (0 bytes): an interrupted save or copy; use an "
            "earlier checkpoint or save it again"
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path)
        if names or "Unsupported global" in str(err):  # a payload, refused
            raise UnsafeCheckpointError(_unsafe_message(path, err, names)) from None
        unreadable = err  # not a pickle of ours at all (random bytes, another format)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError) as err:
        unreadable = err
    else:
        unreadable = None
    if unreadable is not None:
        reason = " ".join(str(unreadable).split()) or type(unreadable).__name__
        reason = reason.split("WeightsUnpickler error:")[-1].split(" Check the ")[0].strip()
        raise UnreadableCheckpointError(
            f"checkpoint '{path}' ({size} bytes) cannot be read: the file is truncated, "
            f"corrupt or not a torch checkpoint ({type(unreadable).__name__}: {reason}); use an "
            "earlier checkpoint or save it again"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(
            f"checkpoint '{path}' holds a {type(ckpt).__name__}, not a checkpoint dict (a "
            "Lightning checkpoint, or {'state_dict': ...})"
        )
    return ckpt


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a torch zip checkpoint's pickle needs beyond the allow-list ([] when none or
    when the file is not a readable zip checkpoint)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) format or not a checkpoint
        return []


def _unsafe_message(path: Path, err: Exception, names: list[str]) -> str:
    found = ", ".join(names) if names else f"see torch's message: {err}"
    return (
        f"refusing to load checkpoint '{path}': its pickle needs globals that are not on the "
        f"weights-only allow-list: {found}. Unpickling them could run arbitrary code, so nothing "
        f"was loaded. Allowed beyond torch's defaults: {', '.join(LEGACY_LIGHTNING_GLOBALS)}. If "
        "you trust the file, re-save just its tensors (e.g. {'state_dict': ...}) and load that."
    )


def get_state_dict(ckpt: Mapping[str, Any], source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return ``ckpt['state_dict']`` or fail naming what the checkpoint holds instead."""
    sd = ckpt.get("state_dict")
    if not isinstance(sd, Mapping):
        keys = ", ".join(sorted(map(str, ckpt.keys()))[:10]) or "nothing"
        raise KeyError(
            f"checkpoint '{source}' has no 'state_dict' (where a Lightning checkpoint stores the "
            f"weights); its top-level keys are: {keys}"
        )
    return dict(sd)


def _preview(keys: list[str], n: int = 5) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _prefixes(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] + "." for k in keys}))


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, expected: str
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that reads.

    Args:
        module: the model to fill.
        state_dict: the weights.
        source: where they came from (a path), for the message.
        expected: what kind of checkpoint fits (e.g. "a taming VQModel state_dict").

    Raises:
        CheckpointMismatchError: naming a few missing / unexpected / mis-shaped keys and the
            top-level prefixes the model expects.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        lines = [
            f"checkpoint '{source}' does not fit {type(module).__name__}: expected {expected}"
        ]
        lines.append(f"(top-level prefixes {_prefixes(list(own))}).")
        if missing:
            lines.append(f"{len(missing)} missing keys: {_preview(missing)}.")
        if unexpected:
            lines.append(
                f"{len(unexpected)} unexpected keys (prefixes {_prefixes(unexpected)}): "
                f"{_preview(unexpected)}."
            )
        if shapes:
            lines.append(
                f"{len(shapes)} shape mismatches (checkpoint vs model): {_preview(shapes, 3)}; "
                "does the model config match the checkpoint's?"
            )
        raise CheckpointMismatchError(" ".join(lines))
    module.load_state_dict(state_dict, strict=True)


def state_fingerprint(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state dict: names, dtypes, shapes and bytes of every tensor.

    Two modules share a fingerprint exactly when their state dicts are equal bit for bit; used
    to check that frozen weights re-read from their own files are the ones a model was trained
    with.
    """
    sd = module.state_dict() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(sd[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_overrides(cls: type, overrides: Mapping[str, Any]) -> None:
    """TypeError naming the load-time overrides that are no constructor argument of `cls`."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} overrides {unknown}; known: {sorted(known)}")


def name_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
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
    cls: type[M], checkpoint: Mapping[str, Any], source: str, marker: str, **overrides: Any
) -> M:
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
