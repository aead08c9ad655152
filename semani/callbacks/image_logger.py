"""Image logging callback: calls ``pl_module.log_images(batch)`` and writes grids.

Every ``every_n_steps`` training steps and on the first batch of every validation epoch, the
module's ``log_images(batch, max_images=...) -> {key: (N,C,H,W) in [-1,1]}`` is run in eval mode
without gradients; each tensor becomes a grid PNG at
``<log_dir>/images/{split}/{key}_gs-{global_step:06}_e-{epoch:03}.png`` and, where present, a
TensorBoard ``add_image`` / wandb ``log_image`` entry. Files and loggers: global rank zero only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

log = logging.getLogger(__name__)


def make_grid(images: Tensor, nrow: int) -> Tensor:
    """(N,C,H,W) in [-1,1] (clamped here) -> a (3, H', W') float grid in [0,1] on the CPU."""
    images = images.detach().float().clamp(-1.0, 1.0).cpu()
    grid = torchvision.utils.make_grid(images, nrow=nrow)  # (3, H', W'), 1 channel -> 3
    return (grid + 1.0) / 2.0


def to_uint8(grid: Tensor) -> np.ndarray:
    """(3,H,W) float [0,1] -> (H,W,3) uint8."""
    return (grid.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def save_png(grid: Tensor, path: Path) -> None:
    """Write a (3,H,W) [0,1] grid as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid)).save(path)


class ImageLogger(pl.Callback):
    """Log ``pl_module.log_images`` grids to PNG files and to TensorBoard / wandb.

    Args:
        every_n_steps: log after a training batch whenever ``trainer.global_step`` has reached a
            new multiple of this (``global_step`` counts optimizer steps).
        max_images: images per key (passed to ``log_images`` and enforced on its output).
        nrow: images per grid row.
        log_on_val: also log the first batch of every validation epoch (not the sanity check).
        log_on_train: log training batches.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        max_images: int = 8,
        nrow: int = 4,
        log_on_val: bool = True,
        log_on_train: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or max_images < 1 or nrow < 1:
            raise ValueError(
                f"every_n_steps, max_images and nrow must be >= 1, got {every_n_steps}, "
                f"{max_images}, {nrow}"
            )
        self.every_n_steps, self.max_images, self.nrow = every_n_steps, max_images, nrow
        self.log_on_val, self.log_on_train = log_on_val, log_on_train
        self._last_bucket = -1  # global_step // every_n_steps at the last training log

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        bucket = trainer.global_step // self.every_n_steps
        if self.log_on_train and bucket != self._last_bucket:
            self._last_bucket = bucket
            self.log_batch(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            self.log_on_val
            and batch_idx == 0
            and dataloader_idx == 0
            and not trainer.sanity_checking
        ):
            self.log_batch(trainer, pl_module, batch, "val")

    def log_batch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str
    ) -> None:
        """Run ``log_images`` on ``batch`` and write every returned tensor as a grid."""
        if not hasattr(pl_module, "log_images"):
            raise AttributeError(
                f"{type(pl_module).__name__} has no log_images(batch, **kw) for ImageLogger"
            )
        root = Path(trainer.log_dir or trainer.default_root_dir)  # all ranks: log_dir broadcasts
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, max_images=self.max_images)
        finally:
            pl_module.train(was_training)
        step, epoch = trainer.global_step, trainer.current_epoch
        for key, value in images.items():
            if not isinstance(value, Tensor) or value.ndim != 4 or value.shape[1] not in (1, 3):
                continue  # log_images may also return non-image entries (e.g. captions)
            grid = make_grid(value[: self.max_images], self.nrow)
            path = root / "images" / split / f"{key}_gs-{step:06}_e-{epoch:03}.png"
            save_png(grid, path)
            self._to_loggers(trainer, f"{split}/{key}", grid, step)
        log.debug("ImageLogger wrote %s images at step %d", split, step)

    @staticmethod
    def _to_loggers(trainer: pl.Trainer, tag: str, grid: Tensor, step: int) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[to_uint8(grid)], step=step)
