"""OmegaConf resolvers the configs use; registered when `semani` is imported.

- `${semani.abspath:<path>}`: the path made absolute (from the current directory) with `~`
  expanded, so paths saved with a model's hyper-parameters still point at the same files when
  the checkpoint is read from another directory (a notebook, another clone).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["register_resolvers"]


def _abspath(path: str) -> str:
    return str(Path(str(path)).expanduser().resolve())


def register_resolvers() -> None:
    """Register the resolvers above (idempotent)."""
    if not OmegaConf.has_resolver("semani.abspath"):
        OmegaConf.register_new_resolver("semani.abspath", _abspath)
