"""Every config composes; struct mode rejects unknown keys; launcher and logger configs build."""

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, REPO_ROOT, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str, tmp_path: Path) -> None:
    config = "eval" if experiment.startswith("eval_") else "train"  # eval.py's experiments
    cfg = compose(config, [f"experiment={experiment}"], tmp_path)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_
    first_line = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[0]
    assert first_line == "# @package _global_"


@pytest.mark.parametrize("debug", DEBUGS)
def test_every_debug_preset_composes(debug: str, tmp_path: Path) -> None:
    cfg = compose("train", [f"debug={debug}"], tmp_path)
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.data.num_workers == 0


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "ddp_cpu"])
def test_trainer_configs(trainer: str, tmp_path: Path) -> None:
    cfg = compose("train", [f"trainer={trainer}"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if trainer.startswith("ddp"):
        assert cfg.trainer.strategy.startswith("ddp")


def test_eval_config_requires_checkpoint(tmp_path: Path) -> None:
    cfg = compose("eval", [], tmp_path)
    assert OmegaConf.is_missing(cfg, "ckpt_path")


def test_unknown_key_is_a_clear_error() -> None:
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.max_stepz'"):
        compose("train", ["trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'lerning_rate'"):
        compose("train", ["lerning_rate=0.1"])


def test_unknown_group_option_is_a_clear_error() -> None:
    with pytest.raises(ConfigCompositionException, match="experiment"):
        compose("train", ["experiment=does_not_exist"])


def test_slurm_launcher_config() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(
            "train",
            ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_
        == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.partition == "gpu" and launcher.gpus_per_node == launcher.tasks_per_node


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many_loggers"])
def test_loggers_instantiate_offline(logger: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = [f"logger={logger}"] + (["logger.wandb.offline=true"] if logger == "wandb" else [])
    cfg = compose("train", overrides, tmp_path)
    from semani.utils.instantiators import instantiate_loggers

    loggers = instantiate_loggers(cfg.logger)
    assert loggers
    for lg in loggers:
        lg.log_metrics({"train/loss": 1.0}, step=0)
        lg.finalize("success")
    if logger == "wandb":
        import wandb

        wandb.finish()
        assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_multirun_writes_one_folder_per_job(tmp_path: Path) -> None:
    """`-m` sweeps: each job composes and runs in its own numbered folder."""
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "-m",
        "seed=1,2",
        "train=false",
        "logger=csv",
        "~callbacks",
        "data=shapes",
        f"data.root={tmp_path}/not_used",
        f"hydra.sweep.dir={sweep_dir}",
        "extras.print_config=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job, seed in zip(jobs, (1, 2)):
        overrides = OmegaConf.load(sweep_dir / job / ".hydra" / "overrides.yaml")
        assert f"seed={seed}" in overrides


def test_instantiate_targets_exist(tmp_path: Path) -> None:
    """Every `_target_` in the default train config names an importable object."""
    cfg = compose("train", [], tmp_path)
    for node in (cfg.trainer, *cfg.callbacks.values(), *cfg.logger.values()):
        hydra.utils.get_class(node._target_)


def test_finetune_step2_requires_the_step1_checkpoint(tmp_path: Path) -> None:
    step1 = compose("train", ["experiment=semani_trans_cub"], tmp_path)
    assert step1.model.vg_prob == 0.0 and step1.model.init_ckpt.endswith("semani_trans_cc12m.ckpt")
    step2 = compose("train", ["experiment=semani_trans_cub", "finetune=step2"], tmp_path)
    assert step2.model.vg_prob == 0.5
    assert OmegaConf.is_missing(step2, "step1_ckpt")
    with pytest.raises(Exception, match="step1_ckpt"):
        OmegaConf.to_container(step2.model, resolve=True, throw_on_missing=True)
    step2 = compose(
        "train", ["experiment=semani_trans_cub", "finetune=step2", "step1_ckpt=/x/last.ckpt"]
    )
    assert step2.model.init_ckpt == "/x/last.ckpt"
    ablation = compose("train", ["experiment=semani_trans_oxford_no_semantic_loss"], tmp_path)
    assert ablation.model.lambda_sem == 0.0 and ablation.model.clip is None
    assert ablation.data.dataset == "oxford"
