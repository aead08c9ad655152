"""The training task: compose -> instantiate -> (validate) -> fit -> (test) -> metrics."""

from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from semani.utils.checkpoint_io import SafeCheckpointIO
from semani.utils.errors import one_line_errors
from semani.utils.instantiators import instantiate_callbacks, instantiate_loggers
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import (
    exit_on_sigterm,
    extras,
    get_metric_value,
    log_hyperparameters,
    task_wrapper,
)
from semani.utils.weights import check_required

log = get_pylogger(__name__)


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the model of ``cfg.model`` on ``cfg.data``; return (metric dict, object dict).

    ``cfg.ckpt_path`` resumes a run: the step counter, optimizer, scheduler and loop states are
    restored from that Lightning checkpoint.
    """
    check_required(cfg)  # required keys and the weight files read, before anything is built
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
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

    metric_dict: dict[str, float] = {}
    if cfg.get("validate_first"):
        log.info("Validating before training (baseline)")
        trainer.validate(
            model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
        )
        metric_dict.update({f"before/{k}": v for k, v in _metrics(trainer).items()})

    if cfg.get("train"):
        log.info("Starting training")
        trainer.fit(
            model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
        )
    metric_dict.update(_metrics(trainer))

    if cfg.get("validate_first") and cfg.get("train") and not trainer.fast_dev_run:
        trainer.validate(model=model, datamodule=datamodule)
        metric_dict.update(_metrics(trainer))
        for key in sorted(k for k in metric_dict if k.startswith("before/")):
            after = metric_dict.get(key.removeprefix("before/"))
            if after is not None:
                log.info(
                    "%s: %.5f before training -> %.5f after", key[7:], metric_dict[key], after
                )

    if cfg.get("test"):
        log.info("Starting testing")
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not ckpt:
            log.warning("No best checkpoint found; testing the current weights")
            ckpt = None
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metric_dict.update(_metrics(trainer))
        log.info("Best checkpoint: %s", ckpt)

    return metric_dict, object_dict


@one_line_errors()
def main(cfg: DictConfig) -> float | None:
    """Entry point for ``train.py``: run extras, train, and return the sweeper's metric; the
    failures a user can fix (missing data, weights or keys) exit with one `error:` line."""
    exit_on_sigterm()
    extras(cfg)
    metric_dict, _ = train(cfg)
    return get_metric_value(metric_dict, cfg.get("optimized_metric"))
