"""Checkpoints as a hostile or unlucky user meets them: a pickle payload under
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` through `eval.py` and `train.py ckpt_path=`, a save killed
mid-write, and corrupt files (truncated, empty, a tensor, a payload) as one line naming the file
in `manipulate.py` and `eval.py`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from semani.utils.checkpoint import load_checkpoint
from semani.utils.checkpoint_io import SafeCheckpointIO
from tests.conftest import REPO_ROOT, compose


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def trans_ckpt(tmp_path: Path) -> Path:
    from tests.test_semani_trans_module import make_module

    module = make_module(clip=None, lambda_sem=0.0)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "good.ckpt"
    torch.save(ckpt, path)
    return path


def _bad(kind: str, tmp_path: Path, good: Path) -> tuple[Path, Path]:
    """A bad checkpoint file of `kind` and the marker a payload would create."""
    marker = tmp_path / f"PWNED_{kind}"
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:65536])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"state_dict": {}, "x": Payload(marker)}, path)
    return path, marker


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("entry", ["eval", "train"])
def test_a_payload_does_not_run_under_force_no_weights_only(
    entry: str, tmp_path: Path, shapes_root: Path
) -> None:
    evil, marker = _bad("payload", tmp_path, tmp_path)
    common = [f"data.root={shapes_root}", "data.batch_size=2", "data.num_workers=0",
              f"hydra.run.dir={tmp_path / 'run'}", "extras.print_config=false",
              "logger=csv", f"ckpt_path={evil}"]  # fmt: skip
    if entry == "eval":
        cmd = [sys.executable, str(REPO_ROOT / "eval.py"), "experiment=vqgan_shapes",
               "trainer.limit_test_batches=1", *common]  # fmt: skip
    else:
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), "experiment=vqgan_shapes",
               "trainer.max_steps=1", "trainer.limit_val_batches=1", "validate_first=false",
               *common]  # fmt: skip
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert not marker.exists()  # the payload never ran
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert str(evil) in line and "posix.system" in line


@pytest.mark.parametrize("kind", ["truncated", "empty", "tensor", "payload"])
def test_corrupt_checkpoints_are_one_line_naming_the_file(
    kind: str, tmp_path: Path, trans_ckpt: Path, shapes_root: Path
) -> None:
    from PIL import Image

    from semani.tasks.eval import main as eval_main
    from semani.tasks.manipulate import main as manipulate_main

    bad, marker = _bad(kind, tmp_path, trans_ckpt)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "white").save(photo)
    overrides = ["method=semani_trans", f"editor.ckpt={bad}", f"image={photo}", f"mask={photo}",
                 "text=a red circle", f"out={tmp_path / 'out'}"]  # fmt: skip
    cfg = compose("manipulate", overrides, tmp_path)
    with pytest.raises(SystemExit) as err:
        manipulate_main(cfg)
    message = str(err.value.code)
    assert message.startswith("error:") and str(bad) in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    cfg = compose("eval", ["experiment=vqgan_shapes", f"ckpt_path={bad}",
                           f"data.root={shapes_root}", "data.num_workers=0",
                           "extras.print_config=false"], tmp_path)  # fmt: skip
    with pytest.raises(SystemExit) as err:
        eval_main(cfg)
    message = str(err.value.code)
    assert message.startswith("error:") and str(bad) in message and "\n" not in message
    assert not marker.exists()


def test_load_checkpoint_messages(tmp_path: Path, trans_ckpt: Path) -> None:
    from semani.utils.checkpoint import (
        CheckpointMismatchError,
        UnreadableCheckpointError,
        UnsafeCheckpointError,
    )

    expected = {"truncated": (UnreadableCheckpointError, "truncated, corrupt"),
                "empty": (UnreadableCheckpointError, "is empty"),
                "tensor": (CheckpointMismatchError, "holds a Tensor"),
                "payload": (UnsafeCheckpointError, "posix.system")}  # fmt: skip
    for kind, (error, words) in expected.items():
        path, marker = _bad(kind, tmp_path, trans_ckpt)
        with pytest.raises(error, match=words) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and not marker.exists()


# -- saving ---------------------------------------------------------------------------------------
SAVER = textwrap.dedent(
    """
    import sys, time, torch
    from semani.utils.checkpoint_io import SafeCheckpointIO

    big = {"state_dict": {"w": torch.ones(64, 1024, 1024)}}  # 256 MB: a save that takes a while
    SafeCheckpointIO().save_checkpoint(big, sys.argv[1])
    """
)


def test_a_killed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while the new last.ckpt is being written: the previous one stays whole and
    loadable; the temporary lives beside it (not in TMPDIR) and the next save removes it."""
    other_fs = tmp_path / "tmpdir"  # TMPDIR elsewhere: it must not be used
    other_fs.mkdir()
    last = tmp_path / "ckpts" / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "step": 1}, last)
    env = {**os.environ, "TMPDIR": str(other_fs), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(last)], env=env)
    try:
        deadline = time.monotonic() + 120
        tmp = []
        while time.monotonic() < deadline:
            tmp = [p for p in last.parent.glob(".last.ckpt.*.tmp") if p.stat().st_size > 0]
            if tmp or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert tmp, "the save never wrote a temporary beside last.ckpt"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-write, not finished
    assert not list(other_fs.iterdir())  # nothing in TMPDIR
    ckpt = io.load_checkpoint(last)  # the previous checkpoint, whole
    assert ckpt["step"] == 1 and torch.equal(ckpt["state_dict"]["w"], torch.arange(4.0))
    io.save_checkpoint({"state_dict": {}, "step": 2}, last)
    assert load_checkpoint(last)["step"] == 2
    assert not list(last.parent.glob(".*.tmp"))  # the killed save's temporary is gone


def test_training_uses_the_safe_checkpoint_io(tmp_path: Path, shapes_root: Path) -> None:
    from semani.tasks.train import train

    cfg = compose("train", ["experiment=vqgan_shapes", f"data.root={shapes_root}",
                            "data.batch_size=2", "data.num_workers=0", "trainer.max_steps=2",
                            "trainer.limit_val_batches=1", "validate_first=false", "logger=csv",
                            "extras.print_config=false"], tmp_path)  # fmt: skip
    _, objects = train(cfg)
    assert isinstance(objects["trainer"].strategy.checkpoint_io, SafeCheckpointIO)
    last = Path(objects["trainer"].checkpoint_callback.last_model_path)
    assert last.is_file() and load_checkpoint(last)["global_step"] == 2
    assert not list(last.parent.glob(".*.tmp"))
