"""SeMani-Trans learns to follow ShapesWorld's captions on a CPU; an untrained one does not.

The whole user path, as the README gives it: `scripts/make_shapes.py`, `train.py
experiment=vqgan_shapes` (3000 batches), `train.py experiment=semani_trans_shapes` (3000 steps),
then `scripts/check_trans_shapes.py` on the trained checkpoint and on one trained for a single
step (the untrained baseline). The check samples an image from each test caption and counts the
caption's entity colours found in it (`colour_recall`) against the colours of another image's
caption (`colour_recall_shuffled`, chance), and compares the image tokens' NLL under the right
and a wrong caption (`caption_nll_gain`, 0 for a model that ignores the text).

Measured by this test (2 cores shared with other jobs, 2026-11-26, 83 minutes; about 50 on idle
cores), 64 test images: trained recall 0.67 vs 0.32 shuffled, NLL gain 0.263 nats, outside_l2
0.0038; untrained 0.44 vs 0.44, NLL gain 0.007. A SHORT run does not pass:
1500 VQGAN batches + 500 transformer steps gave recall 0.09 vs 0.16 and an NLL gain of 0.018
nats (the transformer learns the images' statistics first and reads the caption later), so this
test runs the full recipe: about 50 minutes on 2 idle cores. `make test-all`, or
`pytest -m slow tests/test_slow_trans_shapes.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

MARGIN = 0.15  # colour_recall - colour_recall_shuffled a model that follows captions exceeds


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=3600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _check(ckpt: Path, data: Path) -> dict:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from check_trans_shapes import main
    finally:
        sys.path.pop(0)
    return main(["--ckpt", str(ckpt), "--data", str(data), "--n", "64"])


def test_shapes_recipe_follows_captions_and_untrained_does_not(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    _run([str(REPO_ROOT / "scripts" / "make_shapes.py"), "--out", str(data), "--n-train",
          "2000", "--n-test", "200", "--size", "64", "--seed", "0"], tmp_path)  # fmt: skip
    common = [f"data.root={data}", "extras.print_config=false"]
    vq_run = [str(REPO_ROOT / "train.py"), "experiment=vqgan_shapes", *common]
    _run([*vq_run, f"hydra.run.dir={tmp_path}/vq"], tmp_path)
    vq = tmp_path / "vq" / "checkpoints" / "last.ckpt"
    trans = [str(REPO_ROOT / "train.py"), "experiment=semani_trans_shapes", *common,
             f"model.vqgan.ckpt_path={vq}"]  # fmt: skip
    _run([*trans, f"hydra.run.dir={tmp_path}/trained"], tmp_path)
    _run([*trans, "trainer.max_steps=1", "trainer.limit_val_batches=0",
          f"hydra.run.dir={tmp_path}/untrained"], tmp_path)  # fmt: skip

    trained = _check(tmp_path / "trained" / "checkpoints" / "last.ckpt", data)
    untrained = _check(tmp_path / "untrained" / "checkpoints" / "last.ckpt", data)
    gain = trained["colour_recall"] - trained["colour_recall_shuffled"]
    baseline = untrained["colour_recall"] - untrained["colour_recall_shuffled"]
    assert gain >= MARGIN, (trained, untrained)
    assert baseline < MARGIN, (trained, untrained)
    # the full recipe's NLL gain was not measured yet: require only that it beats the untrained
    assert trained["caption_nll_gain"] > untrained["caption_nll_gain"], (trained, untrained)
    assert trained["outside_l2"] < 0.05  # forced tokens: only decoder bleed outside the edit
