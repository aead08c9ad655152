"""`SafeCheckpointIO`: Lightning's checkpoints written atomically and read weights-only.

Lightning writes a checkpoint through an fsspec transaction whose temporary file lives in
`TMPDIR`; when that is another file system than the log folder (a node-local `/tmp`, a shared
log folder: a common cluster setup) the final move is a copy that first truncates the
destination, and a job killed during it leaves a truncated `last.ckpt` with the previous good one
gone. Here the checkpoint is written to a hidden temporary file *in the destination's folder*
(`.<name>.<pid>.<random>.tmp`), flushed to disk, then renamed over the destination with
`os.replace` (atomic on one file system): a kill at any moment leaves the previous checkpoint
whole. Temporaries left by killed saves of the same checkpoint are removed by the next save.

Every checkpoint Lightning reads (resume, `trainer.validate/test(ckpt_path=)`) goes through
`semani.utils.checkpoint.load_checkpoint`: weights-only unpickling with the project's
allow-list, whatever `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` says, and errors that name the file.
The tasks pass it to every `Trainer` they build (`semani.tasks.train`, `semani.tasks.eval`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from semani.utils.atomic import atomic_path
from semani.utils.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["SafeCheckpointIO"]


def _alive(pid: str) -> bool:
    """Whether the process that named a temporary file is still running (it may be saving)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, same-folder checkpoint writes; weights-only reads (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed save
            if not _alive(stale.name.split(".")[-3]):
                stale.unlink(missing_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            log.warning("weights_only=False is ignored: %s is read weights-only", path)
        return load_checkpoint(path)  # on the CPU; Lightning moves the tensors
