"""Helpers shared by the task functions: the crash-safe wrapper, extras and metric lookup."""

import functools
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from semani.utils.errors import USER_ERRORS
from semani.utils.pylogger import get_pylogger

log = get_pylogger(__name__)


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable:
    """Run a task so that a crash is logged with the output folder and the loggers are closed."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        try:
            return task(cfg)
        except USER_ERRORS:  # the entry point prints it as one line
            log.debug("Task %s failed", task.__name__, exc_info=True)
            raise
        except Exception:
            log.exception("Task %s failed; outputs are in %s", task.__name__, _output_dir(cfg))
            raise
        finally:
            log.info("Output dir: %s", _output_dir(cfg))
            _close_wandb()

    return wrapped


def _output_dir(cfg: DictConfig) -> str:
    try:
        return str(cfg.paths.output_dir)
    except Exception:  # the interpolation needs Hydra's runtime config
        return "<unknown>"


def _close_wandb() -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        log.info("Closing wandb run")
        wandb.finish()


def extras(cfg: DictConfig) -> None:
    """Apply ``cfg.offline`` (``HF_HUB_OFFLINE=1`` before anything is loaded: hub ids and
    open_clip tags are read from the caches only) and ``cfg.extras``: silence warnings, require
    tags, print and save the config tree."""
    if cfg.get("offline"):
        from semani.utils.hub import set_offline

        set_offline()
    if not cfg.get("extras"):
        return
    if cfg.extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.extras.get("enforce_tags") and not cfg.get("tags"):
        raise ValueError(
            "No tags given: set tags=[...] on the command line (extras.enforce_tags)."
        )
    if cfg.extras.get("print_config"):
        print_config_tree(cfg, save_to_file=True)


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to_file: bool = False) -> None:
    """Log the composed config as a rich tree; optionally save it as ``config_tree.log``."""
    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = (
            OmegaConf.to_yaml(value, resolve=False)
            if isinstance(value, DictConfig)
            else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to_file:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "config_tree.log", "w") as f:
            rich.print(tree, file=f)


@rank_zero_only
def log_hyperparameters(object_dict: dict[str, Any]) -> None:
    """Send the composed config and parameter counts to every logger of the trainer."""
    cfg: DictConfig = object_dict["cfg"]
    model = object_dict["model"]
    trainer = object_dict["trainer"]
    if not trainer.logger:
        log.warning("No logger: hyper-parameters are not logged.")
        return
    hparams: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    hparams.pop("hydra", None)
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    for lg in trainer.loggers:
        lg.log_hyperparams(hparams)


def get_metric_value(metric_dict: dict[str, Any], metric_name: str | None) -> float | None:
    """``metric_dict[metric_name]`` as a float (for sweepers); error if it was never logged."""
    if not metric_name:
        return None
    if metric_name not in metric_dict:
        raise KeyError(
            f"optimized_metric={metric_name!r} was not logged; logged metrics: "
            f"{sorted(metric_dict)}"
        )
    value = float(metric_dict[metric_name])
    log.info("Retrieved metric value %s=%s", metric_name, value)
    return value


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what SLURM, docker and `kill` send) into `SystemExit(143)` in the main
    thread, so that `finally` blocks run and no temporary file is left, as after Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
