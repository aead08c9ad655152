"""The weight files a configuration reads, checked before anything is built.

A method config (configs/method/) lists them under `weights`: `{config key: how to get it}`
(a null entry is not checked). `missing_weights(cfg)` returns the entries whose value is
missing (`???`; null for the editor's weights: an editor cannot run without them) or a local
path (absolute, `./`, `~`) that does not exist; a null value elsewhere (no weights, e.g. a
random CLIP in tests) and anything else (a hub name, an open_clip tag) are left to the model's
own loading. `check_weights(cfg)` raises for the first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["MissingWeight", "check_required", "check_weights", "is_local_path", "missing_weights"]


@dataclass(frozen=True)
class MissingWeight:
    """One weight entry that cannot be read: its config key, its value (None: unset) and how
    to get it."""

    key: str
    path: str | None
    maker: str

    def message(self) -> str:
        if self.path is None:
            return f"missing required {self.key}: pass {self.key}=<file> (made by: {self.maker})"
        return f"{self.key}={self.path} does not exist; it is made by: {self.maker}"


def is_local_path(value: str) -> bool:
    """Whether a weight value names a local file or folder (else: a hub name or a tag)."""
    return os.path.isabs(value) or value.startswith((".", "~"))


def missing_weights(cfg: Any, skip: Iterable[str] = ()) -> list[MissingWeight]:
    """The `cfg.weights` entries (except keys under a prefix of `skip`, and keys the config
    does not have, e.g. of another segmenter) that are missing or a local path that does not
    exist."""
    skip = tuple(skip)
    found = []
    for key, maker in (cfg.get("weights") or {}).items():
        key = str(key)
        if maker is None or (skip and key.startswith(skip)):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if node is None or leaf not in node:
            continue
        maker = " ".join(str(maker).split())
        value = None if OmegaConf.is_missing(node, leaf) else node[leaf]
        if value is None and (OmegaConf.is_missing(node, leaf) or key.startswith("editor.")):
            found.append(MissingWeight(key, None, maker))  # an editor cannot run without them
            continue
        if (
            value is not None
            and is_local_path(str(value))
            and not Path(str(value)).expanduser().exists()
        ):
            found.append(MissingWeight(key, str(value), maker))
    return found


def check_weights(cfg: Any, skip: Iterable[str] = ()) -> None:
    """`FileNotFoundError` naming the first missing weight and how to get it (see
    `missing_weights`)."""
    missing = missing_weights(cfg, skip)
    if missing:
        raise FileNotFoundError(missing[0].message())


def check_required(cfg: Any, skip: Iterable[str] = ()) -> None:
    """Before anything is built: a required key (`???`, outside `hydra`) that was not given is
    a `ValueError` naming it, then `check_weights`."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    makers = cfg.get("weights") or {}
    if missing:
        maker = makers.get(missing[0])
        how = f" (made by: {' '.join(str(maker).split())})" if maker else ""
        raise ValueError(f"missing required {', '.join(missing)}: pass {missing[0]}=...{how}")
    check_weights(cfg, skip)
