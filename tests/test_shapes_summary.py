"""The summary of `make shapes-models` (`semani.tasks.shapes_report.summary_report`): every
stage's figure on tiny random exports, measured alike for the trained and the untrained tree;
summary.md and summary.json with the same numbers; missing exports as notes; Table I and the
real driver at a tiny scale (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from semani.data.shapes import SHAPES
from semani.tasks import shapes_report
from semani.tasks.shapes_report import (
    SUMMARY,
    Setting,
    measure_summary,
    summary_report,
    table1_metrics,
)
from tests.conftest import REPO_ROOT, load_script

STAGES = load_script("shapes_models").STAGES
INSTALL = {s.name: s.install for s in STAGES}
N = 3  # test images per figure
COLUMNS = ("stage", "figure", "trained", "untrained", "chance", "n")


def _install_tiny_models(pre: Path, inpaint_folder: Path, tmp: Path) -> None:
    """Every stage's export, a tiny random model, where the stage installs it."""
    import open_clip

    from semani.metrics import ShapesClassifier
    from semani.models.vqgan import VQGANModule
    from semani.modules.diffusion_parts import tiny_vae
    from semani.modules.mask_clip import MaskPromptCLIP
    from tests.test_segmenters import tiny_mask2former
    from tests.test_semani_trans_module import VQ, make_module

    def dest(stage: str) -> Path:
        path = pre / INSTALL[stage]
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    torch.manual_seed(0)
    vq = VQGANModule(**VQ)
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()},
               dest("vqgan_shapes"))  # fmt: skip
    trans = make_module(clip=None, lambda_sem=0.0)
    ckpt = {"hyper_parameters": dict(trans.hparams), "state_dict": trans.state_dict()}
    trans.on_save_checkpoint(ckpt)
    torch.save(ckpt, dest("semani_trans_shapes"))
    clip = dest("clip_shapes")
    torch.save(open_clip.create_model("semani-shapes-ViT").state_dict(), clip)
    prompt = MaskPromptCLIP("semani-shapes-ViT", str(clip), depth=3)
    torch.save(prompt.mask_prompt_state(str(clip)), dest("mask_prompt_shapes"))
    shutil.copytree(tiny_mask2former(tmp / "m2f"), dest("entityseg_shapes"))
    torch.save(ShapesClassifier(width=4).export(), dest("classifier_shapes"))
    tiny_vae().save_pretrained(dest("vae_shapes"))
    shutil.copytree(inpaint_folder, dest("semani_diff_shapes"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, inpaint_folder: Path) -> Path:
    """A pretrained dir with every export, and `untrained/`: the very same files."""
    tmp = tmp_path_factory.mktemp("summary_models")
    pre = tmp / "pretrained"
    _install_tiny_models(pre, inpaint_folder, tmp)
    shutil.copytree(pre, tmp / "copy")
    os.replace(tmp / "copy", pre / "untrained")
    return pre


def _md_rows(markdown: str) -> list[dict[str, str]]:
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(COLUMNS) + " |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(dict(zip(COLUMNS, line[2:-2].split(" | "))))
    return rows


def _same_numbers(summary: dict, markdown: str) -> None:
    md = _md_rows(markdown)
    assert len(md) == len(summary["rows"])
    for got, row in zip(md, summary["rows"]):
        assert got["stage"] == row["stage"] and got["figure"] == row["figure"]
        assert int(got["n"]) == row["n"]
        for key in ("trained", "untrained", "chance"):
            assert (None if got[key] == "–" else float(got[key])) == row[key], (row, key)


def _check_ranges(row: dict) -> None:
    assert row["n"] > 0, row
    for key in ("trained", "untrained"):
        v = row[key]
        if v is None:
            continue
        if "L1" in row["figure"]:
            assert 0 <= v <= 2, row  # images in [-1, 1]
        elif "NLL" in row["figure"]:
            assert -10 < v < 10, row
        elif "per image" in row["figure"]:
            assert v >= 0, row
        else:  # fractions
            assert 0 <= v <= 1, row
    if row["chance"] is not None:
        assert 0 <= row["chance"] <= 1, row


def test_every_stage_is_measured_alike_trained_and_untrained(
    pretrained: Path, shapes_root: Path, tmp_path: Path
) -> None:
    parts = [p for p in SUMMARY if not p.label.startswith("Table I")]
    setting = Setting(shapes_root, N, INSTALL, pretrained, tmp_path)
    rows, notes = measure_summary(setting, pretrained / "untrained", parts)
    assert notes == []
    assert {r["stage"] for r in rows} >= set(INSTALL)  # every stage has its own figures
    assert {r["stage"] for r in rows} >= {"main job, SeMani-Diff pipeline",
                                         "main job, SeMani-Trans pipeline"}  # fmt: skip
    for row in rows:
        _check_ranges(row)
        # the untrained tree holds the same files: the same seeded measurement, the same numbers
        assert row["trained"] == row["untrained"], row
    by = {(r["stage"], r["figure"]): r for r in rows}
    assert by["clip_shapes", "caption R@1 image->text"]["chance"] == pytest.approx(1 / N, 1e-3)
    assert by["classifier_shapes", "accuracy"]["chance"] == pytest.approx(1 / 7, 1e-3)
    assert by["mask_prompt_shapes", "masked entity's shape named"]["chance"] == pytest.approx(
        1 / len(SHAPES), 1e-3
    )
    assert by["vqgan_shapes", "reconstruction L1"]["n"] == N


def test_the_summary_files_hold_the_same_numbers_and_name_what_is_missing(
    pretrained: Path, shapes_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    pre = tmp_path / "pre"
    for stage in ("vqgan_shapes", "classifier_shapes"):
        for tree in (pre, pre / "untrained"):
            (tree / INSTALL[stage]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pretrained / INSTALL[stage], tree / INSTALL[stage])
    (pre / "untrained" / INSTALL["classifier_shapes"]).unlink()  # an untrained twin missing
    parts = [p for p in SUMMARY if p.label in ("vqgan_shapes", "classifier_shapes", "clip_shapes")]
    monkeypatch.setattr(shapes_report, "SUMMARY", tuple(parts))
    args = Namespace(data=shapes_root, pretrained_dir=pre, logs_dir=tmp_path / "logs",
                     report_n=N, preset=None)  # fmt: skip
    summary = summary_report(args, minutes_so_far=12.0)
    md = (tmp_path / "logs" / "summary.md").read_text()
    assert json.loads((tmp_path / "logs" / "summary.json").read_text()) == summary
    _same_numbers(summary, md)
    assert md in capsys.readouterr().out  # printed
    rows = {(r["stage"], r["figure"]): r for r in summary["rows"]}
    assert set(rows) == {("vqgan_shapes", "reconstruction L1"), ("classifier_shapes", "accuracy")}
    assert rows["vqgan_shapes", "reconstruction L1"]["untrained"] is not None
    assert rows["classifier_shapes", "accuracy"]["untrained"] is None
    assert rows["classifier_shapes", "accuracy"]["trained"] is not None
    notes = summary["notes"]
    assert len(notes) == 2 and all(n in md for n in notes)
    assert notes[0].startswith("clip_shapes: no trained figures, ")  # in the stages' order
    assert f"{pre / INSTALL['clip_shapes']} is not installed (make clip_shapes first)" in notes[0]
    assert notes[1].startswith("classifier_shapes: no untrained figures, ")
    assert summary["minutes"] >= 12.0 and summary["report_n"] == N
    assert len(summary["commit"]) == 40 and isinstance(summary["dirty"], bool)
    assert summary["date"].endswith("+00:00") and summary["command"].startswith("python ")
    assert summary["commit"] in md and summary["date"] in md
    assert not list((tmp_path / "logs").glob(".*"))  # no temporary files left


def test_table1_rows_come_from_eval_py(
    pretrained: Path, shapes_root: Path, tmp_path: Path
) -> None:
    """`eval.py protocol=table1` for the trained SeMani-Diff (a subprocess, about 15 s); an
    untrained row would be scored by the trained metrics' models."""
    parts = [p for p in SUMMARY if p.label == "Table I, SeMani-Diff"]
    setting = Setting(shapes_root, 2, INSTALL, pretrained, tmp_path / "work")
    run = tmp_path / "work" / "table1_semani_diff_shapes"
    (run / "images").mkdir(parents=True)
    (run / "images" / "old.png").write_bytes(b"")  # a run folder resumes: it starts afresh
    rows, notes = measure_summary(setting, None, parts)
    assert notes == []
    by = {r["figure"]: r for r in rows}
    assert list(by) == ["IS", "CLIP-score", "R@1 (%)", "R@5 (%)", "R@10 (%)", "L2 error",
                        "entity not found"]  # fmt: skip
    assert all(r["n"] == 2 and r["untrained"] is None for r in rows)
    assert by["IS"]["trained"] >= 1 and by["L2 error"]["trained"] >= 0
    assert 0 <= by["R@10 (%)"]["trained"] <= 100 and 0 <= by["entity not found"]["trained"] <= 1
    assert by["R@1 (%)"]["chance"] == pytest.approx(100 / 40)  # 8 test images: 80 captions / 2
    assert (run / "table1.csv").is_file() and run.with_name(run.name + ".log").is_file()
    assert not (run / "images" / "old.png").exists()

    metrics = table1_metrics("semani_diff_shapes", pretrained)
    assert metrics == [
        f"metrics.classifier.path={pretrained / INSTALL['classifier_shapes']}",
        f"metrics.clip_pretrained={pretrained / INSTALL['clip_shapes']}",
    ]


@pytest.mark.slow
def test_the_full_preset_ends_with_the_summary(tmp_path: Path) -> None:
    """`scripts/shapes_models.py --preset full` at a tiny scale: every stage trained and its
    untrained twin, then the summary (several minutes on 2 CPU cores)."""
    data, logs = tmp_path / "shapes", tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    make = [sys.executable, "scripts/make_shapes.py", "--out", str(data), "--n-train", "40",
            "--n-test", "12", "--size", "64", "--seed", "0"]  # fmt: skip
    subprocess.run(make, cwd=REPO_ROOT, env=env, check=True)
    cmd = [sys.executable, "scripts/shapes_models.py", "--preset", "full", "--steps-scale",
           "0.002", "--data", str(data), "--pretrained-dir", str(tmp_path / "pre"),
           "--logs-dir", str(logs), "--report-n", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((logs / "summary.json").read_text())
    md = (logs / "summary.md").read_text()
    _same_numbers(summary, md)
    assert summary["notes"] == []
    stages = {r["stage"] for r in summary["rows"]}
    assert stages >= set(INSTALL)
    assert {"Table I, SeMani-Diff", "Table I, SeMani-Trans", "Table I, Blended LDM"} <= stages
    for row in summary["rows"]:
        assert row["trained"] is not None, row
        if not row["stage"].startswith("Table I") or row["stage"] == "Table I, SeMani-Diff":
            assert row["untrained"] is not None, row
        if not row["stage"].startswith("Table I"):
            _check_ranges(row)
