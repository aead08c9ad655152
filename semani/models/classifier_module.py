"""Train the ShapesWorld classifier of the Inception Score (`experiment=classifier_shapes`).

`ClassifierModule` trains `semani.metrics.shapes_classifier.ShapesClassifier` with cross-entropy
on the class of each image: `batch[label_key]` when the data gives one, else derived from the
image's key (`"NNN.<shape>/<image>"` -> NNN - 1): the data sets do not return the class, so the
module looks up `batch["index"]` in the keys of the data module's dataset of the stage
(`trainer.datamodule.data_train` / `data_val` / `data_test`, through `Subset` wrappers).

Logs `train/loss`, `train/acc`, `val/loss`, `val/acc`, `test/acc`. At the end of training the
classifier goes to `<run>/<export_dir>/shapes_classifier.pt`, the file the `metrics=shapes`
config reads (`load_shapes_classifier` also opens this module's Lightning checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from semani.metrics.shapes_classifier import ShapesClassifier, class_from_key
from semani.utils.checkpoint import export_dir, name_checkpoint, rebuild_strict
from semani.utils.lr_schedule import cosine_warmup_config, decay_groups

log = logging.getLogger(__name__)

__all__ = ["ClassifierModule", "EXPORT_NAME", "dataset_labels"]

EXPORT_NAME = "shapes_classifier.pt"
_STAGE_DATA = {"train": "data_train", "val": "data_val", "test": "data_test"}


def dataset_labels(dataset: Any) -> Tensor:
    """(N,) class of every image of a keyed reader (CUB layout), through `Subset`-like wrappers
    (`.dataset` / `.base`); indexed by the readers' sample `index`."""
    ds = dataset
    while ds is not None and not hasattr(ds, "keys"):
        inner = getattr(ds, "dataset", None)
        ds = inner if inner is not None else getattr(ds, "base", None)
    if ds is None:
        raise TypeError(
            f"{type(dataset).__name__} has no image keys to take classes from; give the batches "
            "a label key instead"
        )
    return torch.tensor([class_from_key(k) for k in ds.keys], dtype=torch.long)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a `ShapesClassifier` (see the module docstring).

    Args:
        num_classes, width, image_size: the `ShapesClassifier`.
        lr: peak AdamW learning rate; weight_decay: on >=2-D weights only.
        warmup_steps: linear warm-up, then cosine to `min_lr_ratio * lr` at the last step.
        hflip: random horizontal flips in training (every ShapesWorld shape is mirror-symmetric).
        export_dir: where under the run folder the trained classifier is written (None: not).
        image_key, label_key: batch keys of the images and (if the data gives it) the class.
    """

    def __init__(
        self,
        num_classes: int = 7,
        width: int = 16,
        image_size: int = 64,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        hflip: bool = True,
        export_dir: str | None = "classifier",
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = ShapesClassifier(num_classes, width, image_size)
        self._labels: dict[str, Tensor] = {}  # stage -> (N,) classes of its dataset
        n = sum(p.numel() for p in self.net.parameters())
        log.info("ClassifierModule: %d classes, width %d, %d px (%.2fM parameters)",
                 num_classes, width, image_size, n / 1e6)  # fmt: skip

    def labels(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        """(B,) the classes of a batch: its `label_key`, else from its images' keys."""
        if self.hparams.label_key in batch:
            return torch.as_tensor(batch[self.hparams.label_key], device=self.device).long()
        if stage not in self._labels:
            dm = getattr(self.trainer, "datamodule", None)
            dataset = getattr(dm, _STAGE_DATA[stage], None)
            if dataset is None:
                raise RuntimeError(
                    f"the batch has no {self.hparams.label_key!r} and the trainer's data module "
                    f"has no {_STAGE_DATA[stage]} to take the classes from"
                )
            self._labels[stage] = dataset_labels(dataset)
        labels = self._labels[stage][torch.as_tensor(batch["index"]).cpu().long()]  # (B,)
        if labels.max() >= self.hparams.num_classes or labels.min() < 0:
            raise ValueError(
                f"class {int(labels.max())} out of range for "
                f"num_classes={self.hparams.num_classes}"
            )
        return labels.to(self.device)

    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[Tensor, Tensor]:
        images = batch[self.hparams.image_key]  # (B, 3, H, W) in [-1, 1]
        if stage == "train" and self.hparams.hflip:
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = self.labels(batch, stage)
        logits = self.net(images)  # (B, num_classes)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        bs = images.shape[0]
        sync = stage != "train"
        self.log(f"{stage}/loss", loss.detach(), prog_bar=stage == "train", batch_size=bs,
                 sync_dist=sync)  # fmt: skip
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train", batch_size=bs, sync_dist=sync)
        return loss, acc

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on >=2-D weights only) with warm-up + cosine per step."""
        hp = self.hparams
        opt = torch.optim.AdamW(decay_groups(self.net.parameters(), hp.weight_decay), lr=hp.lr)
        return cosine_warmup_config(
            opt, self.trainer.estimated_stepping_batches, hp.warmup_steps, hp.min_lr_ratio
        )

    # ---------------------------------------------------------------- checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        name_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        """Write `<run>/<export_dir>/shapes_classifier.pt` (not in fast_dev_run)."""
        folder = export_dir(self)
        if folder is None:
            return
        out = folder / EXPORT_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.export(), out)
        log.info("ShapesWorld classifier written to %s", out)

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> ClassifierModule:
        """A checkpoint already read -> a new module, loaded strictly."""
        return rebuild_strict(cls, checkpoint, source, "num_classes", **overrides)
