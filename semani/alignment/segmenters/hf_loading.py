"""Loading transformers models and processors from a folder or a hub id, with one clear error.

A hub id ("facebook/mask2former-swin-large-coco-panoptic") is transformers' to download into the
Hugging Face cache (its own progress bars) or, offline (`HF_HUB_OFFLINE=1`, or the `offline:
true` config key), to read from there: `local_files_only` follows
`semani.utils.hub.is_offline()` at call time.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from semani.utils.hub import (
    cached_snapshot,
    download_error,
    first_line,
    hub_cache_dir,
    looks_like_hub_id,
    not_cached_error,
    offline_scope,
)

log = logging.getLogger(__name__)

__all__ = ["ModelNotFoundError", "from_pretrained", "warn_allow_download"]


class ModelNotFoundError(FileNotFoundError):
    """A segmenter's weights are neither in the given folder nor in the Hugging Face cache."""


def warn_allow_download(allow_download: bool | None) -> None:
    """The segmenters' former `allow_download` argument: a no-op now, with a warning."""
    if allow_download is not None:
        warnings.warn(
            "allow_download is deprecated and ignored: a hub id is downloaded into the Hugging "
            "Face cache unless HF_HUB_OFFLINE=1 (or offline=true in the config)",
            FutureWarning,
            stacklevel=3,
        )


def from_pretrained(
    cls: Any,
    model_name_or_path: str | Path,
    allow_download: bool | None = None,
    how_to_get: str = "",
    *,
    what: str = "model_name_or_path",
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(model_name_or_path, **kwargs)`` for a folder or a hub id.

    ``allow_download`` is ignored (kept for the callers written before hub ids downloaded by
    default; the segmenters warn when a user sets it).

    A folder is read as it is (``local_files_only=True``). A hub id is downloaded by transformers
    into the Hugging Face cache, or read from there when `semani.utils.hub.is_offline()`. A
    missing folder, a folder without the model's files, or (offline) a hub id absent from the
    cache raises ``ModelNotFoundError`` on one line naming what is missing and how to get it
    (``how_to_get``; ``what``: the argument to pass a folder to); an online failure is a
    ``semani.utils.hub.HubDownloadError`` naming the id.
    """
    from huggingface_hub.errors import HFValidationError

    name = str(model_name_or_path)
    if not name:
        raise ValueError("model_name_or_path is empty")
    if name.startswith("~"):
        name = str(Path(name).expanduser())

    def missing(detail: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"no {cls.__name__} at {name!r}: {detail}. {how_to_get}")

    if not looks_like_hub_id(name):  # a folder
        if not Path(name).is_dir():
            raise missing("the folder does not exist")
        try:
            return cls.from_pretrained(name, local_files_only=True, **kwargs)
        except (OSError, HFValidationError) as err:
            raise missing(
                "the folder lacks its files (config.json, the weights, the processor config) "
                f"({first_line(err)})"
            ) from err

    cache_dir = hub_cache_dir()
    with offline_scope() as offline:
        if offline and cached_snapshot(name, cache_dir) is None:
            raise ModelNotFoundError(str(not_cached_error(name, what=what, cache_dir=cache_dir)))
        try:
            model = cls.from_pretrained(
                name, local_files_only=offline, cache_dir=cache_dir, **kwargs
            )
        except (OSError, HFValidationError) as err:
            if offline:
                raise missing(
                    f"the cached copy in {cache_dir} lacks its files ({first_line(err)})"
                ) from err
            raise download_error(name, err, what) from err
    log.info("%s: %s from the Hugging Face cache %s", name, cls.__name__, cache_dir)
    return model
