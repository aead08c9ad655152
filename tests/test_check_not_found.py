"""scripts/check_not_found.py: the false-edit and refusal rates of the alignment phase, on
ShapesWorld and on the COCO layout with instances, for the pipeline manipulate.py builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semani.data.shapes_generator import SHAPES
from semani.data.smoke_trees import write_coco
from tests.conftest import load_script
from tests.test_manipulate import _aligner

check = load_script("check_not_found")


def _row(present: float, absent: float, aligned: bool = True) -> dict:
    return {"present_best": present, "absent_best": absent, "present_aligned": aligned,
            "present_top_class": present > absent, "absent_top_class": False,
            "present_named_on_true_mask": aligned}  # fmt: skip


def test_plans_name_a_unique_entity_and_a_vocabulary_word_it_lacks(
    shapes_root: Path, tmp_path: Path
) -> None:
    dataset, vocabulary = check.test_set("shapes", shapes_root, None, 64)
    assert vocabulary == list(SHAPES)
    cases = check.plan(dataset, vocabulary, 0, 8, seed=0)
    assert cases and cases == check.plan(dataset, vocabulary, 0, 8, seed=0)  # seeded
    for i, k, present, absent in cases:
        names = dataset[i]["entity_names"]
        assert names[k] == present and names.count(present) == 1
        assert absent in vocabulary and absent not in names

    root = write_coco(tmp_path / "coco", 1, 4, size=64)
    dataset, vocabulary = check.test_set("coco", root, None, 64)
    instances = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    assert vocabulary == sorted(c["name"] for c in instances["categories"])
    cases = check.plan(dataset, vocabulary, 0, 4, seed=1)
    assert cases
    for i, _, present, absent in cases:
        names = dataset[i]["entity_names"]
        assert present in names and absent not in names and absent in vocabulary
    with pytest.raises(FileNotFoundError, match="instances_val2014.json is missing"):
        check.test_set("coco", tmp_path / "elsewhere", None, 64)


def test_calibration_and_rates() -> None:
    rows = [_row(0.9, 0.1), _row(0.8, 0.7, aligned=False), _row(0.3, 0.2), _row(0.6, 0.5)]
    t = check.calibrate(rows)
    # no threshold on a fine grid balances found present and refused absent words better
    pos = np.array([r["present_best"] for r in rows])
    neg = np.array([r["absent_best"] for r in rows])
    best = max(((pos >= c).mean() + (neg < c).mean()) / 2 for c in np.linspace(0, 1, 101))
    assert ((pos >= t).mean() + (neg < t).mean()) / 2 == pytest.approx(best)
    m = check.measure(rows, 0.55)
    assert (m["false_edit_rate"], m["refused_present"], m["aligned_present"]) == (0.25, 0.25, 0.5)
    assert m["vocabulary_rule"] == {"false_edit_rate": 0.0, "refused_present": 0.0}
    assert m["named"] == {"true_mask": 0.75, "best_proposal": 1.0}
    keep_best = check.measure(rows + [_row(0.5, float("-inf"))], None)  # nothing to edit: -inf
    assert keep_best["false_edit_rate"] == 0.8 and keep_best["refused_present"] == 0.0


def test_run_measures_the_configured_default_and_a_calibrated_threshold(
    shapes_root: Path, tmp_path: Path, inpaint_folder: Path
) -> None:
    from tests.test_segmenters import tiny_mask2former

    m2f = tiny_mask2former(tmp_path / "m2f")
    dataset, vocabulary = check.test_set("shapes", shapes_root, None, 64)
    overrides = [f"editor.source={inpaint_folder}", "editor.side=null",
                 *_aligner(m2f, ["alignment.threshold=0.05"], mode=None)]  # fmt: skip
    result = check.run("semani_diff", tmp_path, dataset, vocabulary, 3, 0, overrides)
    configured = result["configured"]
    assert configured["threshold_mode"] == "strict" and configured["threshold"] == 0.05
    calibrated = result["calibrated"]
    assert calibrated["held_out"]["threshold"] == pytest.approx(calibrated["threshold"], abs=1e-4)
    # every rate is a share of the cases, and the configured run counts both halves
    n = calibrated["calibration"]["n"] + calibrated["held_out"]["n"]
    assert configured["n"] == n > 0
    for m in (configured, calibrated["calibration"], calibrated["held_out"]):
        assert 0 <= m["false_edit_rate"] <= 1 and 0 <= m["refused_present"] <= 1
        assert all(0 <= v <= 1 for v in m["named"].values())
    assert result["keep_best"]["refused_present"] == 0.0
    assert result["keep_best"]["false_edit_rate"] >= configured["false_edit_rate"]
    keep_best = check.run("semani_diff", tmp_path, dataset, vocabulary, 3, 0,
                          [*overrides, "alignment.threshold_mode=keep_best"])  # fmt: skip
    assert keep_best["configured"]["threshold"] is None
    assert keep_best["configured"]["refused_present"] == 0.0  # every present word is edited
