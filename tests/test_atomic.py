"""`semani.utils.atomic`: whole files or nothing, and never a temporary left behind."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semani.utils import atomic
from semani.utils.atomic import atomic_dir, replace_dir, save_image, write_csv, write_text


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.md", "# héllo\n")
    assert path == tmp_path / "a.md"
    assert path.read_text(encoding="utf-8") == "# héllo\n"
    write_text(path, "again\n")  # over an existing file
    assert path.read_text() == "again\n"
    assert _listing(tmp_path) == ["a.md"]


def test_write_csv(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": "x", "extra": "ignored"}, {"a": 2}]
    path = write_csv(tmp_path / "t.csv", rows, ["a", "b"])
    with path.open(newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", "x"], ["2", ""]]
    assert _listing(tmp_path) == ["t.csv"]


def test_save_image(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    path = save_image(tmp_path / "x.png", Image.fromarray(array))
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), array)
    assert _listing(tmp_path) == ["x.png"]


class Boom(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise Boom("disk full")


def _partial_then_raise(self: Path, *args, **kwargs):
    """`Path.write_text` that writes half the file, then fails."""
    with open(self, "w") as f:
        f.write("half")
    raise Boom("disk full")


@pytest.mark.parametrize(
    "write, patch",
    [
        (lambda p: write_text(p, "new"), (Path, "write_text", _partial_then_raise)),
        (lambda p: write_csv(p, [{"a": 1}], ["a"]), (atomic.csv.DictWriter, "writerows", _raise)),
        (lambda p: save_image(p, Image.new("RGB", (2, 2))), (Image.Image, "save", _raise)),
    ],
    ids=["write_text", "write_csv", "save_image"],
)
def test_a_failure_keeps_the_old_file(tmp_path: Path, monkeypatch, write, patch) -> None:
    path = tmp_path / "out.dat"
    path.write_bytes(b"old")
    monkeypatch.setattr(*patch)
    with pytest.raises(Boom):
        write(path)
    assert path.read_bytes() == b"old"
    assert _listing(tmp_path) == ["out.dat"]  # no temporary left


def test_a_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic.os, "replace", _raise)
    with pytest.raises(Boom):
        write_text(tmp_path / "a.txt", "text")
    assert _listing(tmp_path) == []


def test_atomic_dir_replaces_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "study"  # the parent is made
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert _listing(out) == ["a.txt"]
    with atomic_dir(out) as tmp:  # over an existing folder
        (tmp / "b.txt").write_text("two")
    assert _listing(out) == ["b.txt"]
    assert _listing(tmp_path / "sub") == ["study"]  # no temporary or old folder left


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("new")
            _raise()
    assert (out / "a.txt").read_text() == "old"
    assert _listing(tmp_path) == ["study"]


def test_replace_dir_puts_the_old_folder_back_on_failure(tmp_path: Path, monkeypatch) -> None:
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "a.txt").write_text("old")
    new.mkdir()
    real = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise Boom("rename failed")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Boom):
        replace_dir(new, out)
    assert (out / "a.txt").read_text() == "old"
    assert _listing(tmp_path) == ["new", "out"]  # the caller still owns `new`


def test_a_failed_write_names_the_destination_not_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    target = tmp_path / "edited.png"
    with pytest.raises(OSError) as err:
        save_image(target, Image.new("RGB", (2, 2)))
    assert err.value.errno == errno.ENOSPC
    assert (
        str(err.value) == f"[Errno {errno.ENOSPC}] cannot write {target}: No space left on device"
    )
    assert ".tmp" not in str(err.value) and not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match=f"cannot write {tmp_path / 'no' / 'x.md'}"):
        write_text(tmp_path / "no" / "x.md", "x")  # a missing folder


SIGTERMED = """
import os, signal, sys, time
from pathlib import Path
from semani.utils.atomic import atomic_path
from semani.utils.task_utils import exit_on_sigterm

exit_on_sigterm()
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGTERM)  # what SLURM and docker send
    time.sleep(30)
"""


def test_sigterm_leaves_no_temporary(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    target = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-c", SIGTERMED, str(target)], env=env, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert _listing(tmp_path) == []  # neither the file nor its temporary
