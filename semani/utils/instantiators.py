"""Build objects from configs: Lightning callbacks and loggers from their groups, and any
`_target_` node with the constructor's own errors (`instantiate_unwrapped`)."""

from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

from semani.utils.pylogger import get_pylogger

log = get_pylogger(__name__)


def _instantiate_group(cfg: DictConfig | None, what: str) -> list:
    objects: list = []
    if not cfg:
        log.info("No %s configured.", what)
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"The {what} config must be a mapping of name -> config, got {type(cfg)}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("Instantiating %s <%s> (%s)", what, name, conf._target_)
            objects.append(hydra.utils.instantiate(conf))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every ``callbacks.<name>`` entry that has a ``_target_``."""
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every ``logger.<name>`` entry that has a ``_target_``."""
    return _instantiate_group(cfg, "logger")


def instantiate_unwrapped(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(cfg, **kwargs)`, but a failing constructor raises its own error
    (e.g. `FileNotFoundError` for missing weights, `ValueError` for a bad option) instead of
    Hydra's `InstantiationException` wrapper, so that a task can print it as one line
    (`semani.utils.errors.one_line`) and callers can catch it by type."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise
