"""`scripts/make_table.py`: the table1.csv rows of several runs beside the paper's Table I."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

from semani.evaluation.paper_table1 import PAPER_TABLE1
from semani.evaluation.tables import TABLE1_COLUMNS, main, merge_rows, read_rows
from tests.conftest import REPO_ROOT


def _run(folder: Path, method: str, dataset: str, **values: float) -> Path:
    folder.mkdir(parents=True)
    row = {"method": method, "dataset": dataset, "mask": "aligned", "n": 100, "skipped": 0,
           "is_mean": 4.5, "is_std": 0.25, "clip_score": 22.125, "r1": 10.0, "r5": 20.0,
           "r10": 30.5, "l2": 0.0123, **values}  # fmt: skip
    with (folder / "table1.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE1_COLUMNS)
        w.writeheader()
        w.writerow(row)
    return folder


def test_paper_numbers_are_transcribed() -> None:
    assert len(PAPER_TABLE1) == 15  # 5 methods x 3 data sets
    expected = {"is_mean": 5.13, "is_std": 0.07, "clip_score": 24.03, "r10": 45.51, "l2": 0.02}
    assert PAPER_TABLE1["SeMani-Diff", "CUB"] == expected
    assert PAPER_TABLE1["ManiGAN", "COCO"]["is_mean"] == 22.65
    assert PAPER_TABLE1["SeMani-Trans", "Oxford"]["r10"] == 36.49  # fmt: skip


def test_two_runs_are_merged_beside_the_paper(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "SeMani-Diff", "CUB", clip_score=25.5)
    b = _run(tmp_path / "b", "SeMani-Diff", "ShapesWorld", r10=80.0)
    md = main([str(a), str(b / "table1.csv"), "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == md
    lines = md.splitlines()
    head = lines[0].split(" | ")
    assert head[2:6] == ["CUB IS", "CUB CLIP-score", "CUB R@10", "CUB L2"]
    assert lines[0].endswith("ShapesWorld L2 |")  # the paper's data sets, then ours
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in lines[2:]}
    assert ("SeMani-Diff", "paper") in rows and ("ManiGAN", "paper") in rows
    ours = rows["SeMani-Diff", "ours"]
    assert "| 4.50 ± 0.25 | 25.50 | 30.50 | 0.0123 |" in ours  # CUB
    assert ours.rstrip(" |").endswith("4.50 ± 0.25 | 22.12 | 80.00 | 0.0123")  # ShapesWorld
    assert "| 5.13 ± 0.07 | 24.03 | 45.51 | 0.02 |" in rows["SeMani-Diff", "paper"]
    order = [k for k in rows]
    assert order.index(("SeMani-Diff", "paper")) + 1 == order.index(("SeMani-Diff", "ours"))
    assert ("SeMani-Trans", "ours") not in rows  # no run of it

    tex = main([str(a), str(b), "--latex"])
    assert tex.startswith("\\begin{tabular}{ll" + "r" * 16 + "}")
    assert "\\multicolumn{4}{c}{CUB}" in tex and "\\multicolumn{4}{c}{ShapesWorld}" in tex
    assert "SeMani-Diff & ours & $4.50 \\pm 0.25$ & 25.50 & 30.50 & 0.0123" in tex
    datasets, only_ours = merge_rows(read_rows([a]), paper=False)
    assert datasets == ["CUB"] and [r["source"] for r in only_ours] == ["ours"]


def test_errors_are_one_line(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "SeMani-Diff", "CUB")
    b = _run(tmp_path / "b", "SeMani-Diff", "CUB")
    with pytest.raises(SystemExit, match="two runs give SeMani-Diff on CUB"):
        main([str(a), str(b)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty/table1.csv does not exist: pass the output"):
        main([str(tmp_path / "empty")])


def test_the_script_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _run(tmp_path / "a", "Blended LDM", "Oxford")
    script = REPO_ROOT / "scripts" / "make_table.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(a)])
    runpy.run_path(str(script), run_name="__main__")  # in-process: a new one imports for ~10 s
    out = capsys.readouterr().out
    assert "| Blended LDM | ours |" in out and "| Blended LDM | paper |" in out


def test_rows_on_different_image_sets_are_refused(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", "SeMani-Diff", "CUB", image_set="abc123", n=100)
    b = _run(tmp_path / "b", "Blended LDM", "CUB", image_set="def456", n=97, skipped=3)
    with pytest.raises(SystemExit, match="scored on different images"):
        main([str(a), str(b)])
    c = _run(tmp_path / "c", "Blended LDM", "CUB", image_set="abc123", not_found=3)
    md = main([str(a), str(c)])  # the same images: side by side
    assert "SeMani-Diff | ours" in md and "Blended LDM | ours" in md
