"""The evaluation task behind ``python eval.py``: three protocols, picked by ``protocol=``.

- ``checkpoint`` (the default): `evaluate` builds ``data``, ``model``, ``callbacks``,
  ``logger`` and ``trainer`` from the config and runs ``trainer.test`` with ``ckpt_path`` (a
  Lightning checkpoint written by ``train.py``) on the data set's test split; returns the test
  metrics (``test/...``). A missing ``ckpt_path`` is one line and a non-zero exit.
- ``alignment`` (``protocol=alignment data=<data>``): the alignment study of every configured
  segmenter x scorer on the test split (`semani.tasks.alignment_study`); writes its Markdown
  and CSV tables to the run folder and returns accuracy and mIoU per combination.
- ``table1`` (``protocol=table1 method=<method> data=<data>``): the paper's Table-I protocol
  (`semani.tasks.table1`): plan a target text per test image, mask, edit, and score IS,
  CLIP-score, R@N and L2; writes the edited images and ``table1.md``/``.csv``/``.tex`` to the
  run folder and returns the row's metrics (``table1/...``).

`main(cfg)` calls the task the protocol's config names (``task``); a protocol that does not
exist is Hydra's error listing the ones in configs/protocol/.
"""

from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from semani.utils.checkpoint_io import SafeCheckpointIO
from semani.utils.errors import one_line_errors
from semani.utils.instantiators import instantiate_callbacks, instantiate_loggers
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import exit_on_sigterm, extras, log_hyperparameters, task_wrapper
from semani.utils.weights import check_required

log = get_pylogger(__name__)


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data``'s test split; return (metric dict, objects)."""
    ckpt_path = Path(str(cfg.ckpt_path))
    if not ckpt_path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist. Pass a Lightning checkpoint written by "
            "train.py, e.g. ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt"
        )
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[SafeCheckpointIO()]
    )
    object_dict = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "callbacks": callbacks,
        "logger": loggers,
        "trainer": trainer,
    }
    log_hyperparameters(object_dict)

    log.info("Testing checkpoint %s", ckpt_path)
    trainer.test(model=model, datamodule=datamodule, ckpt_path=str(ckpt_path), weights_only=True)
    metric_dict = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metric_dict, object_dict


USAGE = (
    "eval.py needs the checkpoint to evaluate: python eval.py experiment=<name> "
    "ckpt_path=logs/<task>/runs/<run>/checkpoints/last.ckpt"
)


@one_line_errors()
def checkpoint(cfg: DictConfig) -> dict[str, float]:
    """``protocol=checkpoint``: test ``cfg.ckpt_path`` (missing or absent, unreadable or unsafe:
    one line and a non-zero exit)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise SystemExit(f"error: {USAGE}")
    if not Path(str(cfg.ckpt_path)).is_file():
        raise SystemExit(f"error: ckpt_path={cfg.ckpt_path} does not exist. {USAGE}")
    extras(cfg)
    check_required(cfg)
    metric_dict, _ = evaluate(cfg)
    return metric_dict


def main(cfg: DictConfig) -> dict[str, float]:
    """Entry point for ``eval.py``: the protocol's task (``task`` of configs/protocol/<name>:
    this module's `checkpoint`, `semani.tasks.alignment_study.main` or
    `semani.tasks.table1.main`)."""
    exit_on_sigterm()
    task = hydra.utils.get_method(str(cfg.get("task", "semani.tasks.eval.checkpoint")))
    if task is not checkpoint:
        extras(cfg)
    return task(cfg)
