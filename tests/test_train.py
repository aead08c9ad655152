"""train.py end to end on ShapesWorld: fast_dev_run, resume from a checkpoint, eval, DDP on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semani.tasks.eval import evaluate
from semani.tasks.train import train
from semani.utils.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT, compose

TINY = [
    "experiment=vqgan_shapes",
    "data.num_workers=0",
    "data.batch_size=4",
    "extras.print_config=false",
    "validate_first=false",
]


def test_vqgan_shapes_fast_dev_run(shapes_root: Path, tmp_path: Path) -> None:
    cfg = compose("train", [*TINY, f"data.root={shapes_root}", "debug=fdr"], tmp_path)
    metrics, objects = train(cfg)
    assert objects["trainer"].fast_dev_run
    assert "train/rec_loss" in metrics and torch.isfinite(torch.tensor(metrics["train/rec_loss"]))


def _fit(shapes_root: Path, out: Path, max_steps: int, ckpt_path: Path | None = None):
    overrides = [
        *TINY,
        f"data.root={shapes_root}",
        f"trainer.max_steps={max_steps}",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.image_logger.every_n_steps=1000",
    ]
    if ckpt_path is not None:
        overrides.append(f"ckpt_path={ckpt_path}")
    cfg = compose("train", overrides, out)
    return train(cfg)


def test_resume_restores_step_and_optimizer_state(shapes_root: Path, tmp_path: Path) -> None:
    _, first = _fit(shapes_root, tmp_path / "a", max_steps=4)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = load_checkpoint(last)
    assert saved["global_step"] == 4
    assert len(saved["optimizer_states"]) == 2  # autoencoder + discriminator

    _, second = _fit(shapes_root, tmp_path / "b", max_steps=8, ckpt_path=last)
    trainer = second["trainer"]
    assert trainer.global_step == 8  # continued from 4, not restarted from 0
    resumed = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 8
    # Adam's step counters continued from the saved ones
    step_before = saved["optimizer_states"][0]["state"][0]["step"]
    step_after = resumed["optimizer_states"][0]["state"][0]["step"]
    assert float(step_after) > float(step_before)


def test_eval_task_on_checkpoint(shapes_root: Path, tmp_path: Path) -> None:
    _fit(shapes_root, tmp_path / "a", max_steps=2)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    cfg = compose(
        "eval",
        [
            "experiment=vqgan_shapes",
            f"data.root={shapes_root}",
            "data.num_workers=0",
            "extras.print_config=false",
            f"ckpt_path={ckpt}",
            "trainer.limit_test_batches=2",
        ],
        tmp_path / "eval",
    )
    metrics, _ = evaluate(cfg)
    assert "test/rec_loss" in metrics


def test_eval_missing_checkpoint_is_a_clear_error(tmp_path: Path, shapes_root: Path) -> None:
    cfg = compose(
        "eval",
        ["experiment=vqgan_shapes", f"data.root={shapes_root}", f"ckpt_path={tmp_path}/x.ckpt"],
        tmp_path,
    )
    with pytest.raises(FileNotFoundError, match="x.ckpt does not exist"):
        evaluate(cfg)


def test_train_py_ddp_cpu_two_processes(shapes_root: Path, tmp_path: Path) -> None:
    """`trainer=ddp_cpu trainer.devices=2` runs a few steps through the real entry point."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        *TINY,
        f"data.root={shapes_root}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=1",
        "callbacks.image_logger.every_n_steps=1000",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4


def test_semani_trans_shapes_fast_dev_run(shapes_root: Path, tmp_path: Path) -> None:
    """`train.py experiment=semani_trans_shapes debug=fdr` with a random stage-1 VQGAN."""
    cfg = compose(
        "train",
        [
            "experiment=semani_trans_shapes",
            f"data.root={shapes_root}",
            "data.batch_size=2",
            "model.vqgan.ckpt_path=null",
            "extras.print_config=false",
            "debug=fdr",
        ],
        tmp_path,
    )
    metrics, objects = train(cfg)
    assert objects["model"].gpt.config.n_layer == 4
    for key in ("train/loss", "train/loss_img", "train/loss_txt"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_semani_trans_shapes_ddp_cpu_with_guidance_and_semantic_loss(
    shapes_root: Path, tmp_path: Path
) -> None:
    """SeMani-Trans on 2 CPU ranks (gloo): vision guidance on half of each rank's samples and
    the CLIP semantic loss on, through the real entry point; data.batch_size is global."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "experiment=semani_trans_shapes",
        f"data.root={shapes_root}",
        "data.num_workers=0",
        "data.batch_size=4",  # global: 2 per rank, one of them guided
        "model.vqgan.ckpt_path=null",  # random conv VQGAN from the config
        "model.lambda_sem=5.0",
        "model.clip={model_name: semani-tiny-ViT, pretrained: null}",
        "model.sem_max_samples=1",
        "model.vg_prob=0.5",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "callbacks.image_logger.every_n_steps=1000",
        "extras.print_config=false",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    steps = [r for r in rows if r.get("train/loss_sem_step")]
    assert len(steps) == 3
    assert all(float(r["train/loss_vg_step"]) > 0 for r in steps)  # guided samples each step
    assert all(0 < float(r["train/loss_sem_step"]) <= 2 for r in steps)  # 1 - cos
