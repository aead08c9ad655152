"""OmegaConf resolvers the configs use; registered when `semani` is imported.

- `${semani.abspath:<path>}`: the path made absolute (from the current directory) with `~`
  expanded, so paths saved with a model's hyper-parameters still point at the same files when
  the checkpoint is read from another directory (a notebook, another clone).
- `${semani.device:}`: "cuda" when a CUDA device is available, else "cpu" (the editors' default).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["register_resolvers"]


def _abspath(path: str) -> str:
    return str(Path(str(path)).expanduser().resolve())


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def register_resolvers() -> None:
    """Register the resolvers above (idempotent)."""
    if not OmegaConf.has_resolver("semani.abspath"):
        OmegaConf.register_new_resolver("semani.abspath", _abspath)
    if not OmegaConf.has_resolver("semani.device"):
        OmegaConf.register_new_resolver("semani.device", _device)
