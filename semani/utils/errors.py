"""The failures a user can fix, and how the entry points print them: one line, no traceback."""

from __future__ import annotations

from semani.utils.checkpoint import CheckpointMismatchError

__all__ = ["USER_ERRORS", "one_line"]

# a missing or unreadable file, a missing optional library, a bad value or option, a checkpoint
# of the wrong kind: the entry points print these as one `error:` line and exit with status 1
USER_ERRORS = (OSError, ImportError, ValueError, CheckpointMismatchError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__
