"""`make smoke-paper` (scripts/smoke_paper.py): the generated data trees are read by the real
readers, the runner records, resumes and skips what a failed step's followers need; the whole
smoke at full architecture size is in the slow suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from semani.data.coco import COCODataset
from semani.data.cub import CUBDataset
from semani.data.smoke_trees import SHAPE_TO_COCO, write_coco, write_cub, write_webdataset
from semani.data.tokenizer import TextTokenizer
from semani.data.webdataset import make_webdataset, resolve_shards
from semani.evaluation.words import caption_entity_words
from tests.conftest import compose, load_script

smoke = load_script("smoke_paper")


def test_generated_trees_are_read_by_the_real_readers(tmp_path: Path) -> None:
    tok = TextTokenizer(context_length=32)
    cub = CUBDataset(write_cub(tmp_path / "birds", 2, 1, size=64), "test", 64, 32, tokenizer=tok)
    assert len(cub) == 1 and cub[0]["image"].shape == (3, 64, 64)

    root = write_coco(tmp_path / "coco", 2, 2, size=96)
    ann = root / "annotations"
    instances = {"train": ann / "instances_train2014.json", "test": ann / "instances_val2014.json"}
    coco = COCODataset(root, "test", 96, 32, tokenizer=tok, instances_json=instances)
    assert len(coco) == 2
    for i in range(2):
        s = coco[i]
        names = set(s["entity_names"])
        assert names and names <= set(SHAPE_TO_COCO.values())
        assert s["entity_masks"].shape[0] == len(s["entity_names"])
        # Table I's caption words exist (word_from=caption, the vocabulary rule)
        assert {category for _, category in caption_entity_words(s["caption"])} & names

    urls = resolve_shards(
        write_webdataset(tmp_path / "cc12m", 2, 3, size=64), "{00000..00001}.tar"
    )
    samples = list(make_webdataset(urls, 64, tok, train=False))
    assert [s["index"] for s in samples] == list(range(6))


def _step(name: str, code: str, needs: tuple[str, ...] = ()):
    return smoke.Step(name, name, lambda c: [sys.executable, "-c", code], needs=needs)


def test_runner_records_resumes_and_skips_followers_of_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    big = "x = bytearray(300 * 2**20); print('made')"
    steps = (
        _step("a", big),
        _step("b", "raise SystemExit(3)", needs=("a",)),
        _step("c", "print('c')", needs=("b",)),
        _step("d", "print('d')", needs=("a",)),
    )
    monkeypatch.setattr(smoke, "STEPS", steps)
    photo = tmp_path / "p.jpg"
    args = ["--out", str(tmp_path / "out"), "--photo", str(photo)]
    assert smoke.main(args) == 1
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())["steps"]
    by = {r["step"]: r for r in report}
    assert by["a"]["rc"] == 0 and by["a"]["peak_rss_gb"] >= 0.29  # the child's own peak
    assert by["b"]["rc"] == 3 and by["c"]["rc"] is None and "needs b" in by["c"]["reason"]
    assert by["d"]["rc"] == 0
    assert (out / "logs" / "a.log").read_text().strip() == "made"
    assert sorted(p.stem for p in (out / "steps").glob("*.json")) == ["a", "d"]
    assert "| b |" in (out / "report.md").read_text()

    # a rerun resumes: only b (and then c) run again
    steps = (steps[0], _step("b", "print('fixed')", ("a",)), *steps[2:])
    monkeypatch.setattr(smoke, "STEPS", steps)
    (out / "logs" / "a.log").unlink()
    assert smoke.main(args) == 0
    assert not (out / "logs" / "a.log").exists()  # not run again
    assert sorted(p.stem for p in (out / "steps").glob("*.json")) == ["a", "b", "c", "d"]
    assert "done earlier" in capsys.readouterr().out


def test_a_disk_without_room_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100e9, 70e9, 30e9))
    out = tmp_path / "not yet"
    with pytest.raises(SystemExit, match=r"up to 45 GB under .*not yet.*only 30 GB is free"):
        smoke.main(["--out", str(out), "--photo", str(tmp_path)])
    assert not out.exists()  # nothing started
    # what is left to run decides: the weights and SeMani-Diff's step done, the rest fits
    (out / "steps").mkdir(parents=True)
    for name in ("weights", "data", "semani_diff_coco"):
        (out / "steps" / f"{name}.json").write_text("{}")
    smoke.check_disk(out, ["semani_trans_cub", "edit_semani_diff"], keep_checkpoints=False)


def test_unknown_step_names_the_steps(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown step.*'nope'.*weights"):
        smoke.main(["--out", str(tmp_path), "--photo", str(tmp_path), "--only", "nope"])


def test_every_paper_command_composes(tmp_path: Path) -> None:
    """Each Hydra command of the smoke composes with its overrides (no run), and the configs
    read the smoke's folders, wherever they are."""
    tmp_path = tmp_path / "a folder, with=odd 'characters'"
    ctx = smoke.Context(tmp_path, tmp_path / "photo.jpg", 2, 512)
    entries = {"train.py": "train", "eval.py": "eval", "manipulate.py": "manipulate"}
    composed = 0
    for step in smoke.STEPS:
        argv = step.command(ctx)
        if argv[1] not in entries:
            continue
        # its run folder is the step's own: the one a rerun clears before it starts
        assert f"hydra.run.dir={smoke.hydra_value(ctx.run_dir(step.name))}" in argv, step.name
        overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
        cfg = compose(entries[argv[1]], overrides)
        assert cfg.paths.pretrained_dir == str(tmp_path / "pretrained"), step.name
        assert cfg.paths.data_dir == str(tmp_path / "data"), step.name
        if step.name in ("table1_semani_diff_coco", "edit_semani_diff"):  # the fine-tuned export
            assert cfg.editor.source == str(tmp_path / "runs/semani_diff_coco/diffusers")
        composed += 1
    assert composed == len(smoke.STEPS) - 2  # all but the weights and data steps


@pytest.mark.slow
def test_smoke_paper_runs_every_paper_experiment_at_full_size(tmp_path: Path) -> None:
    """The whole smoke (16 minutes on 2 CPU cores, up to 45 GB of disk, 21 GB of memory)."""
    out = tmp_path / "smoke"
    assert smoke.main(["--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(r["rc"] == 0 for r in report["steps"])
    params = report["params"]
    assert params["sd2-inpainting: unet"] == 865_925_124  # SD-2-inpainting: 9 input channels
    assert 152e6 < params["SeMani-Trans (CUB step 2): gpt"] < 154e6
