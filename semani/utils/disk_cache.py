"""Results worth keeping between processes, in the user's cache folder.

`cache_dir()` is ``$SEMANI_CACHE_DIR``, else ``$XDG_CACHE_HOME/semani``, else
``~/.cache/semani`` (the libraries' convention: Hugging Face and torch cache under
``~/.cache`` too). `file_key(path, **parts)` names a result computed from a file: a hash of
the file's resolved path, size and modification time with the other inputs (JSON-able), so that
a replaced checkpoint or another vocabulary is computed afresh. `load_tensors` / `save_tensors`
read and write a dict of tensors and plain values weights-only and atomically; a missing,
unreadable or foreign entry is a miss (None), never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from semani.utils.atomic import atomic_path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "file_key", "load_tensors", "save_tensors"]


def cache_dir() -> Path:
    """The folder semani caches into (see the module docstring)."""
    given = os.environ.get("SEMANI_CACHE_DIR")
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "semani"


def file_key(path: str | os.PathLike, **parts: Any) -> str:
    """A hex key for a result of the file `path` and the inputs `parts` (JSON-able)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    ident = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **parts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def load_tensors(path: Path) -> dict[str, Any] | None:
    """The dict saved at `path`, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: recompute, overwrite
        log.warning("ignoring the unreadable cache entry %s: %s", path, err)
        return None
    return value if isinstance(value, dict) else None


def save_tensors(path: Path, value: dict[str, Any]) -> bool:
    """Write `value` to `path` atomically; False (logged) when the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
    except OSError as err:
        log.warning("cannot write the cache entry %s (%s): computed again next time", path, err)
        return False
    return True
