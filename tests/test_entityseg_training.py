"""experiment=entityseg_shapes: composes, runs fast_dev_run (no export), exports after a real
run a folder the mask2former segmenter loads, and the module's loss and recall behave on a
tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semani.tasks.train import train
from tests.conftest import compose

pytest.importorskip("scipy", reason="Mask2Former's Hungarian matcher needs scipy")

TINY = [
    "experiment=entityseg_shapes",
    "data.num_workers=0",
    "data.batch_size=4",
    "extras.print_config=false",
    "validate_first=false",
    # a smaller model than the experiment's, same code
    "model.config.backbone_config.embed_dim=16",
    "model.config.backbone_config.depths=[1,1,1,1]",
    "model.config.decoder_layers=2",
    "model.config.encoder_layers=1",
    "model.config.train_num_points=256",
]


def test_entityseg_shapes_fast_dev_run_and_export(shapes_root: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    cfg = compose(
        "train",
        [*TINY, f"data.root={shapes_root}", "debug=fdr", f"model.export_dir={export}"],
        tmp_path / "run",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].fast_dev_run
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["val/recall@0.5"] <= 1.0
    assert not export.exists()  # a smoke run never overwrites an installed segmenter
    export.mkdir()
    (export / "stale.txt").write_text("from an earlier install")
    cfg = compose(
        "train",
        [*TINY, f"data.root={shapes_root}", "trainer.max_steps=1", "trainer.limit_val_batches=1",
         f"model.export_dir={export}"],
        tmp_path / "run2",
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert not (export / "stale.txt").exists()  # replaced whole
    # the exported folder is a model_name_or_path of the mask2former segmenter
    from semani.alignment.segmenters import build_segmenter
    from semani.data.shapes import ShapesWorldDataset

    assert (export / "config.json").is_file() and (export / "preprocessor_config.json").is_file()
    seg = build_segmenter("mask2former", model_name_or_path=export, threshold=0.0)
    sample = ShapesWorldDataset(shapes_root, split="test", image_size=64)[0]
    props = seg.segment(sample["image"])
    assert props.size == (64, 64) and props.masks.dtype == torch.bool
    # the segmenter sees what the module saw: same proposals from the same weights
    module = objects["model"].eval()
    with torch.no_grad():
        outputs = module(sample["image"][None])
    (direct,) = panoptic(module, outputs, threshold=0.0)
    assert torch.equal(direct.masks, props.masks)


def panoptic(module, outputs, threshold: float):
    from semani.alignment.segmenters.mask2former import panoptic_proposals

    return panoptic_proposals(outputs, [(64, 64)], threshold=threshold)


def test_loss_decreases_on_one_batch(shapes_root: Path, tmp_path: Path) -> None:
    """A few steps on one batch lower Mask2Former's matched loss (the labels are wired)."""
    import hydra

    cfg = compose("train", [*TINY, f"data.root={shapes_root}"], tmp_path)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = module(batch["image"], batch["entity_masks"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
