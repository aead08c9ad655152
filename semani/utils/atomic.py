"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Each function writes to a temporary name in the destination's folder (same file system, so the
rename is atomic), then `os.replace`-s it over the destination. On any error, `KeyboardInterrupt`
included (and SIGTERM in the entry points, `semani.utils.task_utils.exit_on_sigterm`), the
temporary is removed and the previous file (if any) is left untouched, so a crash never leaves a
half-written table, image or questionnaire behind. A failed write (a full disk, a read-only
folder) is an `OSError` naming the destination, never the hidden temporary.

- `atomic_path(path)`: the building block, a context manager yielding the temporary file's path;
- `write_text(path, text)`, `write_csv(path, rows, fieldnames)`, `save_image(path, image)`;
- `atomic_dir(path)` and `replace_dir(tmp, path)`: the same for a whole folder.

Temporary names start with a dot and end in ``.tmp`` (``.<name>.<pid>.<random>.tmp``), so they
are hidden and easy to recognise; they never clash between processes (e.g. ``torchrun`` ranks
writing into a shared folder).
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["atomic_dir", "atomic_path", "replace_dir", "save_image", "write_csv", "write_text"]


def _temporary_name(path: Path) -> Path:
    """A fresh hidden sibling of `path`: ``.<name>.<pid>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, move it to
    `path` with `os.replace`. On an error the temporary is deleted and `path` is untouched.

        with atomic_path(out / "model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:  # name the destination, not the hidden temporary
        reason = err.strerror or " ".join(str(err).split()) or type(err).__name__
        raise type(err)(err.errno, f"cannot write {path}: {reason}") from err
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the rename


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; return `path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_csv(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    fieldnames: Sequence[str],
    encoding: str = "utf-8",
) -> Path:
    """Write `rows` (dicts) as a CSV with a header of `fieldnames` to `path` atomically; keys
    not in `fieldnames` are ignored, missing ones are left empty. Returns `path`."""
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding=encoding) as f:
            w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return Path(path)


def save_image(path: str | os.PathLike, image: Image.Image, format: str = "PNG") -> Path:
    """Save the PIL `image` to `path` atomically (as `format`: PNG unless told); return `path`."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format)
    return Path(path)


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the folder `tmp` to `path` (same file system). An existing `path` is first renamed
    aside, then deleted once `tmp` is in place; if that move fails it is put back. Returns
    `path`."""
    tmp, path = Path(tmp), Path(path)
    if not path.exists() and not path.is_symlink():
        os.replace(tmp, path)
        return path
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / "x")
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / "x", path)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; when the block ends without error, it
    replaces `path` (`replace_dir`: an existing folder is swapped out, then deleted). On an
    error the temporary folder is deleted and `path` is untouched.

        with atomic_dir(out) as tmp:
            (tmp / "index.html").write_text(page)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
