"""The Hugging Face hub as the libraries use it: offline switch, cache folder, one-line errors.

The loaders (`semani.modules.diffusion_parts`, the segmenters' `hf_loading`, `semani.modules.clip`)
accept a hub id ("stabilityai/stable-diffusion-2-inpainting") wherever a config takes a folder;
the library (diffusers, transformers, huggingface_hub) downloads it into its standard cache with
its own progress bars, or reads it from there when offline. This module holds what they share:

- `is_offline()`: `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` read *at call time* (huggingface_hub
  reads them once, at import), so the loaders pass `local_files_only=<offline>` explicitly, from
  `with offline_scope() as offline:` (which also sets huggingface_hub's own flag meanwhile);
  `set_offline()` is what the `offline: true` config key does (`semani.utils.task_utils.extras`).
- `hub_cache_dir()`: the cache the libraries use (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`), read at call time as well.
- `looks_like_hub_id(text)`: "org/name" that is not a local path.
- `cached_snapshot(repo_id)`: the cached snapshot folder of a repository, or None (no network).
- `not_cached_error` / `download_error`: the one-line errors (offline and not cached: what is
  missing and the command that gets it; online: the library's error, naming the id).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "HubDownloadError",
    "NotInCacheError",
    "cached_snapshot",
    "download_command",
    "download_error",
    "first_line",
    "hub_cache_dir",
    "is_offline",
    "local_folder_hint",
    "looks_like_hub_id",
    "not_cached_error",
    "offline_scope",
    "offline_reason",
    "set_offline",
]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's `_is_true`
# "org/name" (the hub's repo id grammar, loosely): no leading dot, one slash
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin", ".json", ".yaml")


class NotInCacheError(FileNotFoundError):
    """Offline, and the hub id is not in the Hugging Face cache."""


class HubDownloadError(OSError):
    """Online, and the hub refused or failed (no such repository, gated, network error)."""


def is_offline() -> bool:
    """Whether the hub must not be contacted: `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to
    1/ON/YES/TRUE in the environment now (not at import time)."""
    return any(os.environ.get(v, "").upper() in _TRUE for v in _OFFLINE_VARS)


@contextmanager
def offline_scope(force: bool = False) -> Iterator[bool]:
    """Yield `is_offline()` (True with `force`), for a loader's hub calls. While offline,
    huggingface_hub's own flag (read once, at import) says so as well, so that the requests it
    makes on the side (the agent registry of its user-agent header) are skipped too, not only
    the downloads that the loader's `local_files_only=True` stops; it is restored afterwards."""
    offline = force or is_offline()
    constants = sys.modules.get("huggingface_hub.constants")
    if not offline or constants is None or constants.HF_HUB_OFFLINE:
        yield offline
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False


def _tell_huggingface_hub() -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def offline_reason() -> str:
    """The variable that makes `is_offline()` true, as `NAME=value` (for messages)."""
    for name in _OFFLINE_VARS:
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    return "HF_HUB_OFFLINE=1"


def set_offline() -> None:
    """Offline from now on: `HF_HUB_OFFLINE=1` and `TRANSFORMERS_OFFLINE=1` in the environment
    (for this process and its children), and huggingface_hub's own flag when it is already
    imported (it reads the variable at import time; its HTTP session checks the flag)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _tell_huggingface_hub()
    log.info("offline: HF_HUB_OFFLINE=1, models are read from the cache %s", hub_cache_dir())


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, as huggingface_hub computes it (`HF_HUB_CACHE`, the legacy
    `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
    `~/.cache/huggingface/hub`), from the environment now."""
    default_home = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "huggingface",
    )
    home = os.path.expandvars(os.path.expanduser(os.environ.get("HF_HOME", default_home)))
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return os.path.expandvars(os.path.expanduser(cache or os.path.join(home, "hub")))


def looks_like_hub_id(text: str | os.PathLike) -> bool:
    """Whether `text` is a hub repository id ("org/name") rather than a local path: one slash,
    no leading `.`, `/` or `~`, no file suffix, and nothing of that name on disk."""
    text = os.fspath(text)
    return (
        bool(_HUB_ID.fullmatch(text))
        and not text.endswith(_FILE_SUFFIXES)
        and not Path(text).exists()
    )


def local_folder_hint(repo_id: str, root: str = "pretrained") -> str:
    """The folder to download `repo_id` into and pass instead of the id: `pretrained/<name>`."""
    return f"{root}/{repo_id.rsplit('/', 1)[-1]}"


def _cli() -> str:
    """huggingface_hub's command line: `hf` (>= 1.0) or `huggingface-cli` (earlier)."""
    try:
        from importlib.metadata import version

        major = int(version("huggingface_hub").split(".")[0])
    except Exception:  # not installed, or an odd version string
        major = 1
    return "hf" if major >= 1 else "huggingface-cli"


def download_command(repo_id: str, folder: str, filename: str | None = None) -> str:
    """The command that downloads `repo_id` (or one of its files) into `folder`."""
    file = f" {filename}" if filename else ""
    return f"{_cli()} download {repo_id}{file} --local-dir {folder}"


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` (its `refs/main`), or None; never the network."""
    from huggingface_hub import snapshot_download

    try:
        with offline_scope(force=True):
            folder = snapshot_download(
                repo_id, cache_dir=cache_dir or hub_cache_dir(), local_files_only=True
            )
    except Exception:  # LocalEntryNotFoundError, an invalid id, an incomplete snapshot
        return None
    return Path(folder)


def first_line(err: BaseException, limit: int = 300) -> str:
    """`TypeName: the first non-empty line of the message`, at most `limit` characters."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_cached_error(
    repo_id: str,
    *,
    what: str | None = None,
    folder: str | None = None,
    filename: str | None = None,
    cache_dir: str | None = None,
    then: str | None = None,
) -> NotInCacheError:
    """One line: `repo_id` is not in the cache and we are offline; the command that downloads
    it (or its file `filename`) into `folder` on a machine with a network, and what to pass
    then: `what=<folder>`, the folder instead of the id when the config key `what` is not
    known, or `then` verbatim."""
    folder = folder or local_folder_hint(repo_id)
    target = f"{folder}/{filename}" if filename else folder
    if then is None:
        then = f"pass {what}={target}" if what else f"pass {target} instead of {repo_id}"
    lead = ""
    if Path(repo_id).parent.is_dir():  # "pretrained/x": a mistyped local folder, most likely
        lead = f"there is no folder {Path(repo_id).absolute()}, and "
    return NotInCacheError(
        f"{lead}{repo_id}{f' ({filename})' if filename else ''} is not in the Hugging Face cache "
        f"({cache_dir or hub_cache_dir()}) and {offline_reason()}: download it on a machine with "
        f"a network (`{download_command(repo_id, folder, filename)}`) and {then}"
    )


def download_error(repo_id: str, err: BaseException, what: str | None = None) -> HubDownloadError:
    """One line naming `repo_id` around the library's error (no such repository, gated,
    network error), with the usual fix for the first two."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    name = f"{what}={repo_id}" if what else repo_id
    login = "hf auth login" if _cli() == "hf" else "huggingface-cli login"
    chain, cause = [], err  # transformers re-raises huggingface_hub's errors as OSError
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        hint = (
            f"the repository is gated: accept its terms on https://huggingface.co/{repo_id} and "
            f"log in (`{login}`, or set HF_TOKEN)"
        )
    elif any(isinstance(e, RepositoryNotFoundError) for e in chain):
        hint = (
            "no such folder here, and no such repository on the Hugging Face hub (or it is "
            f"private: log in with `{login}`); check the path or the id"
        )
    else:
        hint = (
            "check the network (or set HF_HUB_OFFLINE=1 to use the cache only), or pass a "
            "local folder"
        )
    reason = first_line(err)
    return HubDownloadError(
        f"could not download {name} from the Hugging Face hub ({reason}): {hint}"
    )
