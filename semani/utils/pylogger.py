"""A python logger that only emits on rank zero in multi-process (DDP) runs."""

import logging

from pytorch_lightning.utilities import rank_zero_only


def get_pylogger(name: str = __name__) -> logging.Logger:
    """``logging.getLogger(name)`` with its emitting methods wrapped to run on rank 0 only."""
    logger = logging.getLogger(name)
    for level in ("debug", "info", "warning", "error", "exception", "fatal", "critical"):
        method = getattr(logger, level)
        if not getattr(method, "_semani_rank_zero", False):
            wrapped = rank_zero_only(method)
            wrapped._semani_rank_zero = True  # type: ignore[attr-defined]
            setattr(logger, level, wrapped)
    return logger
