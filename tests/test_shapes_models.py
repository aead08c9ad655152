"""`scripts/shapes_models.py`: every ShapesWorld model in dependency order, each export installed
where the evaluation and app configs read it; resumable, atomic installs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, compose, load_script

sm = load_script("shapes_models")
NAMES = [s.name for s in sm.STAGES]


def _args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--pretrained-dir", str(tmp_path / "pre"),
            "--logs-dir", str(tmp_path / "logs"), "--device", "cpu", "--no-report",
            *extra]  # fmt: skip


def _arg(cmd: list[str], key: str) -> str | None:
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(key + "=")), None)


# ------------------------------------------------------------------------------------ (a)


def test_dry_run_lists_stages_in_dependency_order(tmp_path: Path, capsys) -> None:
    pre, logs, data = tmp_path / "pre", tmp_path / "logs", tmp_path / "no_data"
    assert sm.main(_args(tmp_path, data, "--dry-run", "--steps-scale", "0.01")) == 0
    out = capsys.readouterr().out
    assert f"make_shapes.py --out {data} --n-train 2000 --n-test 200 --size 64 --seed 0" in out
    cmds = {}
    for line in out.splitlines():
        if "train.py" in line:
            cmd = line.split("$ ", 1)[1].split()
            cmds[_arg(cmd, "experiment")] = cmd
    assert list(cmds) == NAMES  # every stage, in the order they run
    for i, stage in enumerate(sm.STAGES):
        cmd = cmds[stage.name]
        assert cmd[0].startswith("OMP_NUM_THREADS=")
        assert _arg(cmd, "hydra.run.dir") == str(logs / stage.name)
        assert _arg(cmd, "data.root") == str(data)
        assert _arg(cmd, "paths.pretrained_dir") == str(pre)
        assert f"export: {logs / stage.name / stage.export} -> {pre / stage.install}" in out
        for _, src in stage.inputs:
            assert NAMES.index(src) < i, (stage.name, src)
    # the cross-stage overrides: each earlier stage's installed export
    assert _arg(cmds["semani_trans_shapes"], "model.vqgan.ckpt_path") == str(
        pre / "vqgan_shapes/last.ckpt"
    )
    assert _arg(cmds["semani_trans_shapes"], "model.clip.pretrained") is None  # lambda_sem = 0
    clip = str(pre / "clip/semani-shapes-ViT.pt")
    assert _arg(cmds["mask_prompt_shapes"], "model.pretrained") == clip
    diff = cmds["semani_diff_shapes"]
    assert _arg(diff, "model.vae") == str(pre / "vae_shapes")
    assert _arg(diff, "model.vae_scaling_factor") == "null"
    assert _arg(diff, "model.train_vae") == "false"
    assert _arg(diff, "model.cache_latents") == "true"  # a frozen VAE: encode each image once
    seg = _arg(cmds["entityseg_shapes"], "model.export_dir")
    assert seg == str(logs / "entityseg_shapes/entityseg_hf")  # not straight into pretrained/
    # --steps-scale 0.01 of each experiment's max_steps; mask_prompt_shapes is 5 epochs of 31
    assert _arg(cmds["vqgan_shapes"], "trainer.max_steps") == "60"
    assert _arg(cmds["semani_diff_shapes"], "trainer.max_steps") == "100"
    assert _arg(cmds["mask_prompt_shapes"], "trainer.max_steps") == "2"  # round(155 * 0.01)
    assert not any(a.startswith("ckpt_path=") for c in cmds.values() for a in c)
    assert not pre.exists() and not logs.exists() and not data.exists()  # nothing written


def test_a_semantic_loss_gets_the_shapes_clip(tmp_path: Path, capsys) -> None:
    clip_on = ["--set", "semani_trans_shapes:model.clip={model_name:semani-shapes-ViT}",
               "--set", "semani_trans_shapes:model.lambda_sem=5"]  # fmt: skip
    only = "--only=vqgan_shapes,clip_shapes,semani_trans_shapes"
    assert sm.main(_args(tmp_path, tmp_path, "--dry-run", only, *clip_on)) == 0
    out = capsys.readouterr().out.splitlines()
    trans = [ln for ln in out if "$ " in ln and "experiment=semani_trans_shapes" in ln]
    cmd = trans[0].split("$ ", 1)[1].split()
    assert _arg(cmd, "model.clip.pretrained") == str(tmp_path / "pre/clip/semani-shapes-ViT.pt")


def test_consumers_read_the_installed_paths(tmp_path: Path) -> None:
    """Each consumer key that a stage declares resolves to that stage's installed export."""
    pre = tmp_path / "pre"
    cfgs = {}
    for stage in sm.STAGES:
        for config, given, key in stage.consumers:
            if (config, given) not in cfgs:
                overrides = [f"paths.pretrained_dir={pre}", *(given or "").split()]
                cfgs[config, given] = compose(config, overrides, tmp_path / "out")
            got = OmegaConf.select(cfgs[config, given], key)
            assert got == str(pre / stage.install), (stage.name, given or config, key)


def test_every_shapes_weight_under_pretrained_is_made_by_a_stage() -> None:
    files = [*CONFIG_DIR.glob("experiment/*shapes*.yaml"), *CONFIG_DIR.glob("method/*shapes.yaml"),
             *CONFIG_DIR.glob("protocol_data/*shapes.yaml"), CONFIG_DIR / "metrics/shapes.yaml",
             CONFIG_DIR / "app.yaml"]  # fmt: skip
    read = set()
    for f in files:
        read |= set(re.findall(r"\$\{paths\.pretrained_dir\}/([\w./-]+)", f.read_text()))
    made = {s.install for s in sm.STAGES}
    made |= {str(Path(m).parent) for m in made}  # app.yaml's `mkdir -p .../clip`
    assert read <= made, read - made


# ------------------------------------------------------------------------------------ (b)


class FakeRunner:
    """Stands in for `run_command`: writes what each training would export."""

    def __init__(self, fail: dict[str, int] | None = None, no_export: str | None = None):
        self.calls: list[list[str]] = []
        self.fail = dict(fail or {})
        self.no_export = no_export

    def __call__(self, cmd, log_path: Path) -> int:
        cmd = list(cmd)
        self.calls.append(cmd)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("fake log\n")
        name = _arg(cmd, "experiment")
        run = Path(_arg(cmd, "hydra.run.dir"))
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run / "checkpoints" / "last.ckpt").write_text(f"{name} step")
        if name in self.fail:  # an interrupted or crashed run leaves its last checkpoint
            return self.fail.pop(name)
        stage = sm.STAGE_BY_NAME[name]
        if name == self.no_export:
            return 0
        export = run / stage.export
        if stage.export.endswith((".pt", ".ckpt")):
            export.parent.mkdir(parents=True, exist_ok=True)
            export.write_text(f"{name} export")
        else:  # a save_pretrained folder
            export.mkdir(parents=True, exist_ok=True)
            (export / "config.json").write_text(json.dumps({"stage": name}))
        return 0

    def stages(self) -> list[str]:
        return [_arg(c, "experiment") for c in self.calls]


class _Done:
    """A finished process (what `start_command` returns, after the fake ran)."""

    def __init__(self, rc: int) -> None:
        self.rc = rc

    def poll(self) -> int:
        return self.rc

    def terminate(self) -> None:
        pass

    def wait(self) -> int:
        return self.rc


def _use(monkeypatch, runner) -> None:
    """Run `runner` in place of every command: the data (run_command) and the stages
    (start_command, which then has finished)."""
    monkeypatch.setattr(sm, "run_command", runner)

    def start(cmd, log_path):
        return _Done(runner(cmd, log_path)), io.StringIO()

    monkeypatch.setattr(sm, "start_command", start)


@pytest.fixture(autouse=True)
def _compose_once(monkeypatch) -> None:
    """Each stage's config is composed once per test (the script composes it on every call)."""
    cache, compose_stage = {}, sm.compose

    def cached(stage, overrides):
        key = (stage, tuple(overrides))
        if key not in cache:
            cache[key] = compose_stage(stage, overrides)
        return cache[key]

    monkeypatch.setattr(sm, "compose", cached)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "shapes"
    folder.mkdir()
    (folder / "shapesworld.json").write_text(json.dumps({"n_train": 32}))
    return folder


def _installed(pre: Path, stage) -> str:
    dest = pre / stage.install
    return (dest / "config.json").read_text() if dest.is_dir() else dest.read_text()


def test_stages_install_then_skip_then_reinstall(
    tmp_path, data, monkeypatch, capsys, caplog
) -> None:
    pre = tmp_path / "pre"
    runner = FakeRunner()
    _use(monkeypatch, runner)
    assert sm.main(_args(tmp_path, data)) == 0
    assert runner.stages() == NAMES
    for stage in sm.STAGES:
        assert stage.name in _installed(pre, stage)
    assert not [p for p in pre.rglob(".*")]  # no temporary or old copies left
    table = capsys.readouterr().out
    assert all(re.search(rf"{n}\s+trained\s", table) for n in NAMES), table

    runner.calls.clear()  # everything installed: nothing runs
    assert sm.main(_args(tmp_path, data)) == 0
    assert runner.calls == []
    table = capsys.readouterr().out
    assert all(re.search(rf"{n}\s+skipped\s", table) for n in NAMES), table

    shutil.rmtree(pre / "entityseg_shapes")  # a finished run is installed again, not retrained
    assert sm.main(_args(tmp_path, data)) == 0
    assert runner.calls == [] and (pre / "entityseg_shapes" / "config.json").is_file()
    assert re.search(r"entityseg_shapes\s+installed\s", capsys.readouterr().out)

    assert sm.main(_args(tmp_path, data, "--force", "--only", "vae_shapes")) == 0
    assert runner.stages() == ["vae_shapes"]
    assert (tmp_path / "logs" / "vae_shapes.prev" / "vae").is_dir()  # the old run, kept aside
    assert not _arg(runner.calls[0], "ckpt_path")

    os.utime(pre / "semani_diff_shapes", (1, 1))  # made from the VAE before this one
    with caplog.at_level(logging.WARNING, logger="shapes_models"):
        assert sm.main(_args(tmp_path, data, "--only", "semani_diff_shapes")) == 0
    assert "semani_diff_shapes was made from an older vae_shapes" in caplog.text


def test_an_interrupted_stage_resumes(tmp_path, data, monkeypatch, capsys) -> None:
    logs, pre = tmp_path / "logs", tmp_path / "pre"
    runner = FakeRunner(fail={"clip_shapes": 130})
    _use(monkeypatch, runner)
    assert sm.main(_args(tmp_path, data)) == 1
    captured = capsys.readouterr()
    assert "stage clip_shapes failed (interrupted: rerun to resume" in captured.err
    assert runner.stages() == ["vqgan_shapes", "clip_shapes"]
    assert (pre / "vqgan_shapes/last.ckpt").is_file() and not (pre / "clip").exists()
    assert re.search(r"semani_diff_shapes\s+not run\s", captured.out)

    runner.calls.clear()
    assert sm.main(_args(tmp_path, data)) == 0
    assert runner.stages() == NAMES[1:]  # vqgan_shapes skipped
    assert _arg(runner.calls[0], "ckpt_path") == str(logs / "clip_shapes/checkpoints/last.ckpt")
    assert all(_arg(c, "ckpt_path") is None for c in runner.calls[1:])
    assert re.search(r"clip_shapes\s+resumed\s", capsys.readouterr().out)


def test_other_overrides_start_afresh(tmp_path, data, monkeypatch) -> None:
    runner = FakeRunner(fail={"vqgan_shapes": 1})
    _use(monkeypatch, runner)
    only = ["--only", "vqgan_shapes"]
    assert sm.main(_args(tmp_path, data, *only)) == 1
    assert sm.main(_args(tmp_path, data, *only, "--steps-scale", "0.5")) == 0
    assert _arg(runner.calls[1], "ckpt_path") is None  # a 3000-step checkpoint is not resumed
    assert (tmp_path / "logs" / "vqgan_shapes.prev" / "checkpoints" / "last.ckpt").is_file()


def test_a_failing_stage_names_itself_and_its_log(tmp_path, data, monkeypatch, capsys) -> None:
    logs, pre = tmp_path / "logs", tmp_path / "pre"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # paths below the working directory are relative
    runner = FakeRunner(fail={"mask_prompt_shapes": 1})
    _use(monkeypatch, runner)
    assert sm.main(_args(tmp_path, data)) == 1
    out, err = capsys.readouterr()
    log = logs / "mask_prompt_shapes.log"
    assert f"stage mask_prompt_shapes failed (exit code 1; log: {log})" in err
    assert runner.stages() == NAMES[: NAMES.index("mask_prompt_shapes") + 1]
    assert not (pre / "mask_prompt_shapes").exists()
    assert re.search(r"mask_prompt_shapes\s+failed\s", out)
    assert re.search(r"entityseg_shapes\s+not run\s", out)

    _use(monkeypatch, FakeRunner(no_export="vae_shapes"))
    assert sm.main(_args(tmp_path, data, "--only", "vae_shapes")) == 1
    assert f"finished without writing {logs / 'vae_shapes' / 'vae'}" in capsys.readouterr().err


def test_a_missing_input_is_named_before_anything_runs(tmp_path, data, monkeypatch) -> None:
    runner = FakeRunner()
    _use(monkeypatch, runner)
    with pytest.raises(SystemExit, match="vqgan_shapes/last.ckpt.*add vqgan_shapes to --only"):
        sm.main(_args(tmp_path, data, "--only", "semani_trans_shapes"))
    assert runner.calls == []


def test_missing_data_is_made_first(tmp_path, monkeypatch) -> None:
    made = []

    def runner(cmd, log_path):
        if "make_shapes.py" in cmd[1]:
            made.append(cmd)
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "shapesworld.json").write_text("{}")
            return 0
        assert made, "a stage ran before the data was made"
        return FakeRunner()(cmd, log_path)

    _use(monkeypatch, runner)
    assert sm.main(_args(tmp_path, tmp_path / "new", "--only", "classifier_shapes")) == 0
    assert made[0][2:] == ["--out", str(tmp_path / "new"), *sm.DATA_ARGS]


def test_install_is_atomic(tmp_path, monkeypatch) -> None:
    dest = tmp_path / "pre" / "model.pt"
    (tmp_path / "a.pt").write_text("new")
    dest.parent.mkdir()
    dest.write_text("old")
    sm.install(tmp_path / "a.pt", dest)
    assert dest.read_text() == "new"

    folder = tmp_path / "pre" / "seg"
    folder.mkdir()
    (folder / "stale.json").write_text("old")
    src = tmp_path / "run" / "seg"
    src.mkdir(parents=True)
    (src / "config.json").write_text("new")
    sm.install(src, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]

    def half_copy(a, b, **kwargs):  # dies halfway through the copy
        Path(b).mkdir()
        (Path(b) / "config.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(sm.shutil, "copytree", half_copy)
    with pytest.raises(OSError, match="disk full"):
        sm.install(src, folder)
    assert (folder / "config.json").read_text() == "new"  # the old export, untouched
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model.pt", "seg"]


# ------------------------------------------------------------------------------------ (c)


def test_one_real_stage_lands_where_the_metrics_read_it(tmp_path, shapes_root, capsys) -> None:
    """classifier_shapes for 2 steps through the real `train.py` subprocess; metrics=shapes
    (the Table-I evaluations) then read the installed classifier."""
    import torch

    from semani.metrics.shapes_classifier import load_shapes_classifier

    pre = tmp_path / "pre"
    tiny = ["data.batch_size=4", "data.num_workers=0", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "extras.print_config=false"]  # fmt: skip
    scale = str(2 / 1500)  # classifier_shapes: 1500 steps -> 2
    argv = _args(tmp_path, shapes_root, "--only", "classifier_shapes", "--steps-scale", scale)
    assert sm.main([*argv, *tiny]) == 0, (tmp_path / "logs/classifier_shapes.log").read_text()
    assert re.search(r"classifier_shapes\s+trained\s", capsys.readouterr().out)
    assert "trainer.max_steps=2" in (tmp_path / "logs/classifier_shapes.log").read_text()
    cfg = compose("eval", ["protocol=table1", "method=semani_diff_shapes", "data=shapes",
                           f"paths.pretrained_dir={pre}"])  # fmt: skip
    path = Path(cfg.metrics.classifier.path)
    assert path == pre / "classifier/shapes_classifier.pt" and path.is_file()
    with torch.no_grad():
        logits = load_shapes_classifier(path)(torch.zeros(1, 3, 64, 64))
    assert logits.shape == (1, 7)


def test_report_overrides_reach_the_report_pipelines(tmp_path, monkeypatch, capsys) -> None:
    """--report-set KEY=VALUE: manipulate.py overrides of the main-job report's pipelines
    (e.g. editor.strength=0.6), named in its header; anything else is refused."""
    args = sm.parse_args(_args(tmp_path, tmp_path, "--report-set", "editor.strength=0.6"))
    assert args.report_set == ["editor.strength=0.6"]
    with pytest.raises(SystemExit):
        sm.parse_args(_args(tmp_path, tmp_path, "--report-set", "strength"))
    assert "--report-set 'strength': want KEY=VALUE" in capsys.readouterr().err

    from semani.tasks import shapes_report

    seen = []

    def fake_build(method, pretrained, overrides=()):
        seen.append(list(overrides))
        raise RuntimeError("stop here")

    monkeypatch.setattr(shapes_report, "build_pipeline", fake_build)
    monkeypatch.setattr(shapes_report, "shapes_test_set", lambda root: None)
    monkeypatch.setattr(shapes_report, "plan_main_job", lambda data, n, seed: [])
    with pytest.raises(RuntimeError, match="stop here"):
        shapes_report.main_job_report(args)
    # the paper's argmax first (the report measures it), then the user's overrides
    assert seen == [["alignment.threshold_mode=keep_best", "editor.strength=0.6"]]
