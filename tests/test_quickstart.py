"""`make quickstart` (`scripts/shapes_models.py --preset quickstart`): the main job's stages,
their untrained twins, then the report of the main job (`semani.evaluation.main_job`) whose
numbers are counted from the edits it wrote to `cases.csv`."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.test_shapes_models import sm

QUICK = ("vae_shapes", "entityseg_shapes", "semani_diff_shapes", "clip_shapes",
         "mask_prompt_shapes")  # fmt: skip
NUMBERS = ("alignment_accuracy", "colour_success", "outside_changed_pixels")


def _check_report(logs: Path) -> dict:
    """The report's files agree: report.json's numbers are the means / sums of cases.csv, and
    report.md shows them. Returns report.json."""
    report = json.loads((logs / "report.json").read_text())
    assert set(report) == {"trained", "untrained", "chance", "minutes"}
    with (logs / "cases.csv").open() as f:
        cases = list(csv.DictReader(f))
    md = (logs / "report.md").read_text()
    for name in ("trained", "untrained"):
        rows = [c for c in cases if c["models"] == name]
        got = report[name]
        assert got["n"] == len(rows) > 0
        assert got["alignment_accuracy"] == pytest.approx(
            sum(int(c["aligned"]) for c in rows) / len(rows), abs=1e-4
        )
        assert got["colour_success"] == pytest.approx(
            sum(int(c["success"]) for c in rows) / len(rows), abs=1e-4
        )
        assert got["outside_changed_pixels"] == sum(int(c["outside_changed"]) for c in rows)
        limits = got["limits"]  # each part's ceiling, counted from the same edits
        for key, column in (("proposal_recall", "recalled"),
                            ("scorer_on_true_masks", "scorer_on_truth"),
                            ("autoencoder_ceiling", "autoencoder_kept")):  # fmt: skip
            mean = sum(int(c[column]) for c in rows) / len(rows)
            assert limits[key] == pytest.approx(mean, abs=1e-4), key
        row = (f"| {name} | {got['alignment_accuracy']:.2f} | {got['colour_success']:.2f} | "
               f"{got['outside_changed_pixels']} | {got['n']} |")  # fmt: skip
        assert row in md
        assert (f"| {name} | {limits['proposal_recall']:.2f} | "
                f"{limits['scorer_on_true_masks']:.2f} | {limits['autoencoder_ceiling']:.2f} |"
                ) in md  # fmt: skip
    trained = [c for c in cases if c["models"] == "trained"]
    chance = report["chance"]
    assert chance["alignment_accuracy"] == pytest.approx(
        sum(float(c["chance_aligned"]) for c in trained) / len(trained), abs=1e-3
    )
    assert chance["colour_success"] == pytest.approx(1 / 11, abs=1e-3)  # the palette's size
    row = f"| chance | {chance['alignment_accuracy']:.2f} | {chance['colour_success']:.2f} |"
    assert row in md
    for name in ("trained", "untrained"):
        for key in ("alignment_accuracy", "colour_success"):
            assert 0 <= report[name][key] <= 1
    assert report["minutes"] > 0
    grid = Image.open(logs / "edits.png")
    assert grid.width == 3 * 96 and grid.height > 96  # input | chosen mask | edit, rows of cases
    return report


def test_quickstart_end_to_end_at_a_tiny_scale(tmp_path: Path, shapes_root: Path, capsys) -> None:
    """Every quickstart stage for a step or two through the real `train.py`, the untrained twins,
    then the main job on 3 held-out test images with both sets of models."""
    logs, pre = tmp_path / "logs", tmp_path / "pre"
    argv = ["--preset", "quickstart", "--device", "cpu", "--data", str(shapes_root),
            "--pretrained-dir", str(pre), "--logs-dir", str(logs), "--steps-scale", "0.002",
            "--report-n", "3", "data.batch_size=4", "data.num_workers=0",
            "extras.print_config=false"]  # fmt: skip
    assert sm.main(argv) == 0
    out = capsys.readouterr().out
    for name in QUICK:
        # the ordinary command is printed before the stage runs, then one line when it ends
        assert re.search(rf"\$ OMP_NUM_THREADS=\d python train.py experiment={name} ", out), name
        assert re.search(rf"\[{name}\] trained in \d+:\d\d", out), name
        assert (pre / sm.STAGE_BY_NAME[name].install).exists()
        assert (pre / "untrained" / sm.STAGE_BY_NAME[name].install).exists()
        assert "trainer.max_steps=1 " in (logs / "untrained" / f"{name}.log").read_text()
    report = _check_report(logs)
    assert report["trained"]["n"] == report["untrained"]["n"] == 3
    # the report is printed, then the commands to try next
    assert "| trained |" in out and "| untrained |" in out
    assert "python manipulate.py method=semani_diff_shapes" in out
    assert "python -m semani.app method=semani_diff_shapes" in out


@pytest.mark.slow
def test_make_quickstart_learns_the_main_job(tmp_path: Path) -> None:
    """The real `make quickstart` (about 20 minutes on 2 idle cores), in a scratch copy of the
    logs and weights: working models pass the bounds, untrained ones fail them."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {**os.environ, "SEMANI_ROOT": str(tmp_path)}
    logs = tmp_path / "logs"
    args = f"--logs-dir {logs} --pretrained-dir {tmp_path / 'pre'}"
    proc = subprocess.run(["make", "quickstart", f"QUICKSTART_ARGS={args}"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = _check_report(logs)
    trained, untrained = report["trained"], report["untrained"]
    assert trained["alignment_accuracy"] >= 0.8 and trained["colour_success"] >= 0.4
    assert trained["outside_changed_pixels"] == 0
    assert untrained["alignment_accuracy"] < 0.5 and untrained["colour_success"] < 0.3
    assert report["minutes"] < 40
