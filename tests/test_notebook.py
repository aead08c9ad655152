"""notebooks/shapesworld_tour.ipynb runs top to bottom on checkpoints trained here for a few steps.

The checkpoints are made as a user makes them: `train.py experiment=vqgan_shapes` (what `make
quickstart` runs) copied to `pretrained/vqgan_shapes/last.ckpt`, then `train.py
experiment=semani_trans_shapes` with its default VQGAN path, both run from a scratch root. The
notebook then runs from `notebooks/` (a Jupyter kernel's cwd), so the frozen VQGAN path saved in
the SeMani-Trans checkpoint must not depend on the directory it was trained from.

Slow (two short trainings and a Jupyter kernel, about a minute on 2 cores): `make test-all`, or
`pytest -m slow tests/test_notebook.py` with the `notebooks` extra installed.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semani.data.shapes_generator import generate_shapes
from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "shapesworld_tour.ipynb"
SHRINK = [
    "data.num_workers=0",
    "data.batch_size=4",
    "data.val_max_samples=8",
    "trainer.limit_val_batches=1",
    "extras.print_config=false",
    "callbacks.image_logger.every_n_steps=1000",
]


def _train(root: Path, run: str, overrides: list[str]) -> Path:
    """`python train.py <overrides>` from `root` (paths.root_dir); returns the run's last.ckpt."""
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *SHRINK, *overrides]
    cmd.append(f"hydra.run.dir={root / run}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEMANI_ROOT", None)
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = root / run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), f"{run} wrote no {ckpt}"
    return ckpt


@pytest.mark.slow
def test_shapesworld_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("nbclient", "nbformat", "matplotlib", "ipykernel"):
        pytest.importorskip(name, reason=f"{name} missing: pip install -e '.[notebooks]'")
    import nbformat
    from nbclient import NotebookClient

    shapes = generate_shapes(tmp_path / "data" / "shapes", n_train=16, n_test=4, size=64)
    vqgan_run = _train(
        tmp_path,
        "vqgan",
        # 4 batches: the VQGAN takes 2 optimiser steps per batch
        ["experiment=vqgan_shapes", f"data.root={shapes}", "trainer.max_steps=8"],
    )
    vqgan_ckpt = tmp_path / "pretrained" / "vqgan_shapes" / "last.ckpt"  # as make quickstart
    vqgan_ckpt.parent.mkdir(parents=True)
    shutil.copy(vqgan_run, vqgan_ckpt)
    trans_ckpt = _train(
        tmp_path,
        "trans",
        ["experiment=semani_trans_shapes", f"data.root={shapes}", "trainer.max_steps=4"],
    )

    # the kernel inherits this environment; the notebook reads its inputs from it
    monkeypatch.setenv("SEMANI_SHAPES", str(shapes))
    monkeypatch.setenv("SEMANI_VQGAN_CKPT", str(vqgan_ckpt))
    monkeypatch.setenv("SEMANI_TRANS_CKPT", str(trans_ckpt))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.outputs or c.execution_count for c in code), (
        f"{NOTEBOOK.name} is committed with outputs: strip them"
    )
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # cwd notebooks/, as Jupyter's
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails

    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    last = code[-1].outputs
    assert any("image/png" in o.get("data", {}) for o in last), (
        f"the last cell showed no image; its outputs: {[o.output_type for o in last]}"
    )
