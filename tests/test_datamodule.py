"""SemaniDataModule from the real data configs: batch format, splits, errors."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import Subset

from semani.data.base import DataLayoutError
from semani.data.datamodule import SemaniDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _data_cfg(name: str, *overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+data={name}", "+paths=default", *overrides])
    return cfg.data


@pytest.mark.parametrize(
    ("name", "dataset", "folder", "size"),
    [
        ("shapes", "shapes", "shapes", 64),
        ("cub", "cub", "birds", 256),
        ("oxford", "oxford", "flowers", 256),
        ("coco", "coco", "coco", 256),
        ("cc12m", "webdataset", "cc12m", 256),
    ],
)
def test_configs_instantiate(name: str, dataset: str, folder: str, size: int) -> None:
    cfg = _data_cfg(name)
    assert Path(cfg.root).name == folder and Path(cfg.root).parent.name == "data"
    dm = instantiate(cfg)
    assert isinstance(dm, SemaniDataModule)
    assert dm.hparams.dataset == dataset and dm.hparams.image_size == size
    assert dm.hparams.context_length == 128 and dm.tokenizer.context_length == 128


def test_shapes_batches(shapes_root: Path) -> None:
    cfg = _data_cfg(
        "shapes",
        f"data.root={shapes_root}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.val_max_samples=5",
    )
    dm = instantiate(cfg)
    dm.setup("fit")
    assert len(dm.data_train) == 32 and isinstance(dm.data_val, Subset) and len(dm.data_val) == 5
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "caption", "tokens", "index", "entity_masks", "entity_names"}
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["tokens"].shape == (4, 128) and batch["tokens"].dtype == torch.long
    assert torch.equal(batch["tokens"], dm.tokenizer(batch["caption"]))
    assert batch["index"].shape == (4,) and batch["index"].dtype == torch.long
    assert len(batch["caption"]) == len(batch["entity_masks"]) == len(batch["entity_names"]) == 4
    for masks, names in zip(batch["entity_masks"], batch["entity_names"]):
        assert masks.shape == (len(names), 64, 64) and 1 <= len(names) <= 3
        assert masks.flatten(1).sum(1).min() > 0
    assert len(dm.train_dataloader()) == 8  # 32 / 4, shuffled
    val = [b for b in dm.val_dataloader()]
    again = [b for b in dm.val_dataloader()]
    assert [b["caption"] for b in val] == [b["caption"] for b in again]  # deterministic
    assert torch.cat([b["index"] for b in val]).tolist() == [0, 2, 4, 5, 7]  # evenly spaced
    dm.setup("test")
    assert sum(len(b["caption"]) for b in dm.test_dataloader()) == 8


def test_shapes_with_workers(shapes_root: Path) -> None:
    dm = SemaniDataModule("shapes", str(shapes_root), image_size=32, batch_size=8, num_workers=2)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [b["image"].shape for b in batches] == [(8, 3, 32, 32)]
    assert batches[0]["entity_masks"][0].shape[1:] == (32, 32)


def test_missing_root_fails_at_setup(tmp_path: Path) -> None:
    dm = instantiate(_data_cfg("shapes", f"data.root={tmp_path / 'nothing'}"))
    with pytest.raises(DataLayoutError, match="make_shapes.py --out"):
        dm.setup("fit")
    dm = instantiate(_data_cfg("cub", f"data.root={tmp_path / 'nothing'}"))
    with pytest.raises(DataLayoutError, match=r"CUB_200_2011/images.txt"):
        dm.setup("fit")


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        SemaniDataModule("imagenet", "/x")
    with pytest.raises(ValueError, match="COCO option"):
        SemaniDataModule("cub", "/x", instances_json="/x.json")
    with pytest.raises(ValueError, match="data.shards"):
        SemaniDataModule("webdataset", "/x")


class _FakeTrainer:
    """What the datamodule reads from a Lightning trainer: the number of processes."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batch_size_is_global(shapes_root: Path, world_size: int) -> None:
    dm = SemaniDataModule("shapes", str(shapes_root), image_size=32, batch_size=8,
                          eval_batch_size=4, num_workers=0)  # fmt: skip
    dm.trainer = _FakeTrainer(world_size)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape[0] == 8 // world_size
    assert next(iter(dm.val_dataloader()))["image"].shape[0] == 4 // world_size


def test_batch_size_not_divisible_by_world_size_is_an_error(shapes_root: Path) -> None:
    dm = SemaniDataModule("shapes", str(shapes_root), image_size=32, batch_size=6, num_workers=0)
    dm.trainer = _FakeTrainer(4)
    with pytest.raises(ValueError, match="batch_size=6 is the global batch.*multiple of 4"):
        dm.setup("fit")
