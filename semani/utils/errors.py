"""The failures a user can fix, and how the entry points print them: one line, no traceback.

`one_line_errors` wraps an entry point (`manipulate.py`, `eval.py`'s protocols, `train.py`): a
`USER_ERRORS` failure (or one of `extra`) exits with status 1 and `error: <message>` on one
line; the traceback goes to the debug log. With `HYDRA_FULL_ERROR=1` the error is raised as it
is, traceback included.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from omegaconf.errors import MissingMandatoryValue

from semani.utils.checkpoint import CheckpointMismatchError, UnsafeCheckpointError

__all__ = ["USER_ERRORS", "one_line", "one_line_errors"]

log = logging.getLogger(__name__)

# a missing, unreadable or unsafe file, a missing optional library, a bad value or option, a
# checkpoint of the wrong kind, a required config value not given: the entry points print these
# as one `error:` line and exit with status 1 (UnreadableCheckpointError is an OSError)
USER_ERRORS = (
    OSError,
    ImportError,
    ValueError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    MissingMandatoryValue,
)


def one_line(err: BaseException) -> str:
    """The error's message on one line (its `summary` when it has one, e.g. a data-layout
    error whose full message lists the expected layout; its type name when it has none)."""
    summary = getattr(err, "summary", None)
    if isinstance(err, MissingMandatoryValue) and getattr(err, "full_key", None):
        summary = f"missing required {err.full_key}: pass {err.full_key}=..."
    return " ".join(str(summary or err).split()) or type(err).__name__


def one_line_errors(
    *extra: type[BaseException], on_error: Callable[[BaseException], None] | None = None
) -> Callable:
    """Decorate an entry point so that the expected failures (`USER_ERRORS` and `extra`) exit
    with one `error:` line (see the module docstring); `on_error(err)` runs first (e.g. to log
    every proposal of an entity that was not found)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (*USER_ERRORS, *extra) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                if on_error is not None:
                    on_error(err)
                log.debug("%s failed", fn.__qualname__, exc_info=True)
                raise SystemExit(f"error: {one_line(err)}") from None

        return wrapped

    return decorate
