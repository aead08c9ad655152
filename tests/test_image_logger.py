"""ImageLogger: when it logs, eval/no-grad around log_images, clamped grids to PNG/TensorBoard."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from semani.callbacks.image_logger import ImageLogger

VALUES = (-1.0, 0.5, 0.0)  # one constant colour per sample


class _Toy(pl.LightningModule):
    """One parameter; ``log_images`` records the mode it ran in and returns x and 3x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[bool, bool, int | None]] = []

    def training_step(self, batch, batch_idx):
        assert self.training  # the callback restored train mode
        return (self.w * batch["image"]).mean() + self.w.square().sum()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def log_images(self, batch, max_images=None, **kwargs):
        self.calls.append((self.training, torch.is_grad_enabled(), max_images))
        x = batch["image"]
        return {"inputs": x, "tripled": 3 * x, "captions": batch["caption"]}


def _loader() -> DataLoader:
    data = [{"image": torch.full((3, 8, 8), v), "caption": f"c{v}"} for v in VALUES * 3]
    return DataLoader(data, batch_size=3)


def _pixel(path: Path, row: int, col: int) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))[row, col]


def test_logs_train_and_val_grids_to_png_and_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _Toy()
    tb = TensorBoardLogger(save_dir=tmp_path, name="tb")
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=tb,
        callbacks=[ImageLogger(every_n_steps=2, max_images=2, nrow=4)],
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(), _loader())
    root = Path(trainer.log_dir) / "images"
    assert root.parent == tmp_path / "tb" / "version_0"
    train = sorted(p.name for p in (root / "train").iterdir())
    assert train == [  # global steps 1 and 2 start new multiples of 2; step 3 does not
        "inputs_gs-000001_e-000.png",
        "inputs_gs-000002_e-000.png",
        "tripled_gs-000001_e-000.png",
        "tripled_gs-000002_e-000.png",
    ]
    val = sorted(p.name for p in (root / "val").iterdir())  # the sanity check is not logged
    assert val == ["inputs_gs-000003_e-000.png", "tripled_gs-000003_e-000.png"]
    assert model.calls == [(False, False, 2)] * 3  # eval mode, no grad, max_images passed

    inputs = root / "train" / "inputs_gs-000001_e-000.png"
    assert Image.open(inputs).size == (22, 12)  # 2 of 3 images (max_images), 8 px + 2 px padding
    assert (_pixel(inputs, 6, 6) == 0).all()  # -1 -> 0
    assert (_pixel(inputs, 6, 16) == 191).all()  # 0.5 -> 0.75 * 255
    tripled = root / "train" / "tripled_gs-000001_e-000.png"
    assert (_pixel(tripled, 6, 6) == 0).all() and (_pixel(tripled, 6, 16) == 255).all()  # clamped

    events = EventAccumulator(str(trainer.log_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"train/inputs", "train/tripled", "val/inputs"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("train/inputs")] == [1, 2]


def test_wandb_logger_gets_uint8_grids() -> None:
    wandb_logger = object.__new__(WandbLogger)  # no wandb run: only log_image is used
    calls = []
    wandb_logger.log_image = lambda **kw: calls.append(kw)
    trainer = SimpleNamespace(loggers=[wandb_logger])
    grid = torch.rand(3, 6, 10)
    ImageLogger._to_loggers(trainer, "val/inputs", grid, step=7)
    (call,) = calls
    assert call["key"] == "val/inputs" and call["step"] == 7
    (array,) = call["images"]
    assert array.shape == (6, 10, 3) and array.dtype == np.uint8
    assert np.array_equal(array, (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        ImageLogger(every_n_steps=0)
