"""`StepProgress`: one plain line per interval with the global step, the elapsed time and the
time left, for logs that a driver reads (`scripts/shapes_models.py` shows every running stage's
line) where a progress bar's carriage returns would not read."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl

__all__ = ["StepProgress", "format_seconds"]

PREFIX = "progress:"


def format_seconds(seconds: float) -> str:
    """3725 -> "1:02:05", 65 -> "1:05"."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepProgress(pl.Callback):
    """Print `progress: step 120/500 (24%), 0:41 elapsed, ETA 2:10` every `every_s` seconds
    (and at the last step) of a fit with `max_steps`; the ETA is the mean step time so far
    times the steps left."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = float(every_s)
        self._start = self._last = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        total, step = trainer.max_steps, trainer.global_step
        now = time.monotonic()
        if total <= 0 or (now - self._last < self.every_s and step < total):
            return
        self._last = now
        done = max(step - self._first, 1)
        eta = (now - self._start) / done * max(total - step, 0)
        print(f"{PREFIX} step {step}/{total} ({100 * step / total:.0f}%), "
              f"{format_seconds(now - self._start)} elapsed, ETA {format_seconds(eta)}",
              flush=True)  # fmt: skip
