"""Loading transformers models and processors from a local folder, with one clear error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ModelNotFoundError", "from_pretrained"]


class ModelNotFoundError(FileNotFoundError):
    """A segmenter's weights are neither in the given folder nor in the Hugging Face cache."""


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub name ("org/model")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def from_pretrained(
    cls: Any,
    model_name_or_path: str | Path,
    allow_download: bool = False,
    how_to_get: str = "",
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(model_name_or_path, local_files_only=not allow_download, **kwargs)``.

    A missing folder (or a hub name absent from the local cache) raises ``ModelNotFoundError``
    naming the folder and how to get it (``how_to_get``) instead of transformers' long errors.
    """
    from huggingface_hub.errors import HFValidationError

    name = str(model_name_or_path)
    if not name:
        raise ValueError("model_name_or_path is empty")
    if name.startswith("~"):
        name = str(Path(name).expanduser())

    def missing(detail: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"no {cls.__name__} at {name!r}: {detail}. {how_to_get}"
            + ("" if allow_download else " Or set allow_download=true to fetch a hub name.")
        )

    if _looks_like_path(name) and not Path(name).is_dir():
        raise missing("the folder does not exist")
    try:
        return cls.from_pretrained(name, local_files_only=not allow_download, **kwargs)
    except (OSError, HFValidationError) as err:
        detail = (
            "the folder lacks its files (config.json, the weights, the processor config)"
            if Path(name).is_dir()
            else "not a folder, and not in the local Hugging Face cache"
        )
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise missing(f"{detail} ({first})") from err
