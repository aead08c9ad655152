"""Make every ShapesWorld model in dependency order and install each export where it is read.

    OMP_NUM_THREADS=1 python scripts/shapes_models.py [--data data/shapes] [--only a,b,...]
        [--steps-scale 0.01] [--dry-run] [--force] [--set STAGE:KEY=VALUE ...] [KEY=VALUE ...]

Each stage is `python train.py experiment=<stage> hydra.run.dir=<logs>/<stage> ...` with the
installed exports of earlier stages as inputs (`STAGES`); its export is then copied under
`--pretrained-dir`, to the place the evaluation and app configs read (`Stage.consumers`),
through a temporary name and a rename. Rerunning the same command resumes: a stage whose export
is installed is skipped (`--force`: made again), a finished run is only installed, an
interrupted one continues from its `checkpoints/last.ckpt` (`ckpt_path=`). A stage's output goes
to `<logs>/<stage>.log`. Trailing `KEY=VALUE` overrides go to every stage, `--set` to one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semani.callbacks.step_progress import PREFIX as PROGRESS
from semani.callbacks.step_progress import format_seconds
from semani.utils.atomic import replace_dir

log = logging.getLogger("shapes_models")

REPO = Path(__file__).resolve().parents[1]
# what the consumers ask for (README "Data"); `shapesworld.json` is written last
DATA_ARGS = ("--n-train", "2000", "--n-test", "200", "--size", "64", "--seed", "0")
DATA_N_TRAIN = 2000
RECORD = "shapes_models.json"  # in a run folder: its overrides and whether it finished
SHAPES_CLIP = "semani-shapes-ViT"


@dataclass(frozen=True)
class Stage:
    """One training of the ShapesWorld proving ground.

    name: the experiment (`configs/experiment/<name>.yaml`), also the run folder's name.
    export: what the run writes, relative to its run folder.
    install: where the consumers read it, relative to the pretrained dir.
    inputs: (override key, stage) pairs: the key gets that stage's installed export.
    extra: fixed overrides this stage needs.
    export_key: an override that points the export into the run folder (`<run>/<export>`).
    clip_key: when the composed config trains with a weightless `semani-shapes-ViT` CLIP
        (`lambda_sem > 0`), this key gets clip_shapes' installed export.
    consumers: (primary config, its overrides or None, key) that read the installed export.
    lr_key: the learning-rate key (0 there, one step: the untrained model, same architecture).
    """

    name: str
    export: str
    install: str
    inputs: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()
    export_key: str | None = None
    clip_key: str | None = None
    consumers: tuple[tuple[str, str | None, str], ...] = ()
    lr_key: str = "model.lr"


_TABLE1 = "protocol=table1 data=shapes method="
_DIFF, _TRANS, _BLENDED = (
    f"{_TABLE1}{m}_shapes" for m in ("semani_diff", "semani_trans", "blended_ldm")
)
_EVALS = (_DIFF, _TRANS, _BLENDED)
# in dependency order: every input comes from an earlier stage
STAGES: tuple[Stage, ...] = (
    Stage("vqgan_shapes", "checkpoints/last.ckpt", "vqgan_shapes/last.ckpt",
          consumers=(("train", "experiment=semani_trans_shapes", "model.vqgan.ckpt_path"),),
          lr_key="model.learning_rate"),
    Stage("clip_shapes", "clip/open_clip_model.pt", f"clip/{SHAPES_CLIP}.pt",
          consumers=(*((("eval", e, "alignment.scorer.pretrained")) for e in _EVALS),
                     ("eval", _DIFF, "metrics.clip_pretrained"),
                     ("eval", "protocol=alignment data=shapes", "study.clip"),
                     ("app", None, "shapes.alignment.scorer.pretrained"))),
    Stage("semani_trans_shapes", "checkpoints/last.ckpt", "semani_trans_shapes/last.ckpt",
          inputs=(("model.vqgan.ckpt_path", "vqgan_shapes"),), clip_key="model.clip.pretrained",
          consumers=(("eval", _TRANS, "editor.ckpt"),), lr_key="model.optimizer.lr"),
    Stage("mask_prompt_shapes", "mask_prompt/mask_prompt.pt", "mask_prompt_shapes/mask_prompt.pt",
          inputs=(("model.pretrained", "clip_shapes"),),
          consumers=(("eval", _DIFF, "alignment.scorer.mask_prompt"),
                     ("eval", _BLENDED, "alignment.scorer.mask_prompt"))),
    Stage("entityseg_shapes", "entityseg_hf", "entityseg_shapes", export_key="model.export_dir",
          consumers=(*((("eval", e, "alignment.segmenter.model_name_or_path")) for e in _EVALS),
                     ("eval", "protocol=alignment data=shapes", "study.entityseg"),
                     ("app", None, "shapes.alignment.segmenter.model_name_or_path")),
          lr_key="model.optimizer.lr"),
    Stage("classifier_shapes", "classifier/shapes_classifier.pt",
          "classifier/shapes_classifier.pt",
          consumers=(("eval", _DIFF, "metrics.classifier.path"),)),
    Stage("vae_shapes", "vae", "vae_shapes"),
    # the VAE stage's latent space stays fixed (no joint training) with its own scaling factor
    Stage("semani_diff_shapes", "diffusers", "semani_diff_shapes",
          inputs=(("model.vae", "vae_shapes"),),
          extra=("model.vae_scaling_factor=null", "model.train_vae=false",
                 "model.cache_latents=true"),
          consumers=(("eval", _DIFF, "editor.source"),
                     ("eval", _BLENDED, "editor.source"),
                     ("app", None, "shapes.editor.source"))),
)  # fmt: skip
STAGE_BY_NAME = {s.name: s for s in STAGES}


@dataclass(frozen=True)
class Preset:
    """What one command makes: its stages (with overrides of their own) and how it is measured.

    report: "main_job" (`semani.evaluation.main_job`: find a named entity and recolour it with
    the trained and the untrained models) or "summary" (every stage's own figure against the
    same model untrained, and Table I).
    """

    name: str
    stages: tuple[str, ...]
    overrides: dict[str, tuple[str, ...]]
    logs: str
    pretrained: str
    report: str


# the main job on the embedded default within minutes on 2 CPU cores (make quickstart): each
# stage a quick scale of its experiment, no validation during training
_QUICK_COMMON = ("trainer.limit_val_batches=0", "validate_first=false", "test=false",
                 "callbacks.image_logger=null")  # fmt: skip
PRESETS = {
    "full": Preset("full", tuple(STAGE_BY_NAME), {}, "logs/shapes_models", "pretrained",
                   "summary"),
    "quickstart": Preset(
        "quickstart",
        # the order the two lanes pick them in: the longest chain (VAE -> UNet) first
        ("vae_shapes", "entityseg_shapes", "semani_diff_shapes", "clip_shapes",
         "mask_prompt_shapes"),
        {
            "vae_shapes": ("trainer.max_steps=1500", *_QUICK_COMMON),
            "entityseg_shapes": ("trainer.max_steps=1500", *_QUICK_COMMON),
            # only the main job's task: every mask one entity, captioned with that entity
            # alone; an EMA of decay 0.999 would still hold the first steps' weights
            "semani_diff_shapes": ("trainer.max_steps=3000", "model.use_ema=false",
                                   "model.masks.entity=1.0", "model.masks.box=0",
                                   "model.masks.stroke=0", "model.masks.entity_union=0",
                                   "data.entity_captions=1.0", *_QUICK_COMMON),
            "clip_shapes": ("trainer.max_steps=250", *_QUICK_COMMON),
            "mask_prompt_shapes": ("trainer.max_epochs=3", *_QUICK_COMMON),
        },
        "logs/quickstart",
        "pretrained/quickstart",
        "main_job",
    ),
}  # fmt: skip


@dataclass
class Plan:
    """What one run of the script does with a stage."""

    stage: Stage
    run_dir: Path
    dest: Path
    needs: list[str]
    overrides: list[str]  # everything after `train.py`, without ckpt_path
    action: str  # skip | install | resume | train
    why: str

    @property
    def source(self) -> Path:
        return self.run_dir / self.stage.export

    @property
    def last_ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    def command(self) -> list[str]:
        resume = [f"ckpt_path={_value(self.last_ckpt)}"] if self.action == "resume" else []
        return [sys.executable, str(REPO / "train.py"), *self.overrides, *resume]


# ---------------------------------------------------------------------------------- helpers


def _value(path: Path | str) -> str:
    """A path as a Hydra override value (quoted when it holds characters Hydra parses)."""
    text = str(path)
    return text if re.fullmatch(r"[\w/.~+-]+", text) else "'" + text.replace("'", r"\'") + "'"


def _show(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def install(src: Path, dest: Path) -> None:
    """Copy `src` (file or folder) to `dest` through a temporary sibling and a rename: `dest`
    is either the old export or the whole new one, never a half-written one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copyfile(src, tmp)
        if dest.is_dir() and not dest.is_symlink():  # a folder cannot be renamed over another
            replace_dir(tmp, dest)
        else:
            os.replace(tmp, dest)
    finally:
        _remove(tmp)
    os.utime(dest)  # its time is the install time (for the staleness warning)


def _threads() -> str:
    """OMP_NUM_THREADS for the trainings: 1 unless set (small CPU models lose with more)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


def start_command(cmd: Sequence[str], log_path: Path) -> tuple[subprocess.Popen, Any]:
    """Start `cmd` with stdout and stderr appended to `log_path` (and OMP_NUM_THREADS);
    (the process, the open log file)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": _threads()}
    out = log_path.open("a")
    out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
    out.flush()
    return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env), out


def run_command(cmd: Sequence[str], log_path: Path) -> int:
    """Run `cmd` with stdout and stderr appended to `log_path`; its exit code (130: Ctrl-C)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": _threads()}
    with log_path.open("a") as out:
        out.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the child got the SIGINT too: let it stop cleanly
            proc.wait()
            return 130


def compose(stage: str, overrides: Sequence[str]) -> Any:
    """The config `train.py experiment=<stage> <overrides>` would run (Hydra's compose API):
    checks the overrides and gives the steps and the CLIP to the plan."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("train", [o for o in overrides if not o.startswith("hydra.")])


def uses_shapes_clip(cfg: Any) -> bool:
    """Does the composed config train with the ShapesWorld CLIP, weights not given?"""
    clip = cfg.model.get("clip")
    return (
        clip is not None
        and clip.get("model_name") == SHAPES_CLIP
        and not clip.get("pretrained")
        and float(cfg.model.get("lambda_sem") or 0) > 0
    )


def scaled_steps(cfg: Any, scale: float, n_train: int) -> list[str]:
    """`trainer.max_steps` (and, for an epoch-bound stage, `max_epochs`) times `scale`."""
    if scale == 1:
        return []
    steps = int(cfg.trainer.max_steps)
    if steps > 0:
        return [f"trainer.max_steps={max(1, round(steps * scale))}"]
    epochs = int(cfg.trainer.max_epochs)  # e.g. mask_prompt_shapes: 5 epochs
    per_epoch = max(1, n_train // int(cfg.data.batch_size))  # drop_last
    return [
        f"trainer.max_steps={max(1, round(epochs * per_epoch * scale))}",
        f"trainer.max_epochs={max(1, math.ceil(epochs * scale))}",
    ]


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _write_record(run_dir: Path, overrides: list[str], done: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{RECORD}.tmp"
    tmp.write_text(json.dumps({"overrides": overrides, "done": done}, indent=1))
    os.replace(tmp, run_dir / RECORD)


def decide(
    stage: Stage, run_dir: Path, dest: Path, overrides: list[str], force: bool
) -> tuple[str, str]:
    """(action, why) from what is on disk."""
    if dest.exists() and not force:
        return "skip", "installed"
    record = _read_record(run_dir)
    same = record is not None and record.get("overrides") == overrides
    if same and record.get("done") and (run_dir / stage.export).exists() and not force:
        return "install", "its run finished"
    if same and not record.get("done") and (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume", "its run was interrupted"
    if run_dir.exists():
        return "train", f"the old run folder goes to {run_dir.name}.prev"
    return "train", "new"


# ------------------------------------------------------------------------------------- plan


UNTRAINED = ("trainer.max_steps=1", "trainer.limit_val_batches=0", "validate_first=false",
             "test=false", "callbacks.image_logger=null")  # fmt: skip


def make_plans(
    args: argparse.Namespace, selected: list[Stage], untrained: bool = False
) -> list[Plan]:
    """One `Plan` per selected stage, in dependency order; raises SystemExit on a missing
    input that no selected stage makes. `untrained`: the same stages for one step at learning
    rate 0 (the initial weights, exported as a trained run's), under `<pretrained>/untrained`
    and `<logs>/untrained`."""
    pretrained, logs = args.pretrained_dir, args.logs_dir
    if untrained:
        pretrained, logs = pretrained / "untrained", logs / "untrained"
    dest = {s.name: pretrained / s.install for s in STAGES}
    info = args.data / "shapesworld.json"
    n_train = json.loads(info.read_text())["n_train"] if info.is_file() else DATA_N_TRAIN
    names = {s.name for s in selected}
    plans = []
    for stage in selected:
        run_dir = logs / stage.name
        own = [o.split(":", 1)[1] for o in args.set if o.split(":", 1)[0] == stage.name]
        user = [*args.overrides, *own]
        base = [
            f"experiment={stage.name}",
            f"hydra.run.dir={_value(run_dir)}",
            f"data.root={_value(args.data)}",
            f"paths.pretrained_dir={_value(pretrained)}",
        ]
        # on a GPU every preset trains at its experiments' own (full-size) scale
        preset = [] if args.device == "cuda" else list(args.preset.overrides.get(stage.name, ()))
        if args.device == "cuda":
            base.append("trainer=gpu")
        if untrained:
            preset = [*UNTRAINED, f"{stage.lr_key}=0"]
        inputs = list(stage.inputs)
        cross = [f"{key}={_value(dest[src])}" for key, src in inputs]
        if stage.export_key:
            cross.append(f"{stage.export_key}={_value(run_dir / stage.export)}")
        cfg = compose(stage.name, [*base, *cross, *stage.extra, *preset, *user])  # checks keys
        if stage.clip_key and uses_shapes_clip(cfg):
            inputs.append((stage.clip_key, "clip_shapes"))
            cross.append(f"{stage.clip_key}={_value(dest['clip_shapes'])}")
        # the scaled steps replace any steps the preset or the user gave
        steps = [] if untrained else scaled_steps(cfg, args.steps_scale, n_train)
        keys = {s.split("=", 1)[0] for s in steps}
        preset = [o for o in preset if o.split("=", 1)[0].lstrip("+~") not in keys]
        user = [o for o in user if o.split("=", 1)[0].lstrip("+~") not in keys]
        overrides = [*base, *cross, *stage.extra, *preset, *steps, *user]
        needs = [src for _, src in inputs]
        for src in needs:
            if src not in names and not dest[src].exists():
                raise SystemExit(
                    f"shapes_models: {stage.name} reads {_show(dest[src])}, which is not "
                    f"installed: add {src} to --only (or run it first)"
                )
        action, why = decide(stage, run_dir, dest[stage.name], overrides, args.force)
        if action == "skip":  # an input remade after this export (or now) makes it stale
            remade = {p.stage.name for p in plans if p.action != "skip"}
            mtime = dest[stage.name].stat().st_mtime
            for src in needs:
                if src in remade or (dest[src].exists() and dest[src].stat().st_mtime > mtime):
                    log.warning("%s was made from an older %s: rerun with --force --only %s",
                                stage.name, src, stage.name)  # fmt: skip
        plans.append(Plan(stage, run_dir, dest[stage.name], needs, overrides, action, why))
    return plans


def _consumers(stage: Stage) -> str:
    """Who reads the installed export: later stages (through this script) and the configs."""
    readers = [f"{s.name} {key}" for s in STAGES for key, src in s.inputs if src == stage.name]
    readers += [f"{over or cfg}: {key}" for cfg, over, key in stage.consumers]
    return ", ".join(dict.fromkeys(readers))


# ------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        default="full",
        choices=sorted(PRESETS),
        help="full: every stage at its experiment's scale, then the summary; quickstart: the "
        "main job's stages at a quick scale, then its report",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/shapes"),
        help="ShapesWorld root; made (2000/200/64 px/seed 0) when missing",
    )
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated stages (default: the preset's): {','.join(STAGE_BY_NAME)}",
    )
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every stage's trainer.max_steps (0.01: a smoke run)",
    )
    p.add_argument("--jobs", type=int, default=None,
                   help="stages run side by side (1 thread each; default 2 on the CPU, 1 on a "
                   "GPU)")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: a CUDA GPU when there is one (trainer=gpu, every stage at its experiment's "
        "own scale, one at a time), else the CPU with the preset's scale",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="remake installed exports too")
    p.add_argument("--no-report", action="store_true", help="train and install only")
    p.add_argument("--report-n", type=int, default=100, help="test images of the main-job report")
    p.add_argument("--pretrained-dir", type=Path, default=None,
                   help="where the exports are installed (paths.pretrained_dir; default: the "
                   "preset's, under SEMANI_ROOT)")  # fmt: skip
    p.add_argument("--logs-dir", type=Path, default=None,
                   help="run folders <logs>/<stage> and logs <logs>/<stage>.log (default: the "
                   "preset's)")  # fmt: skip
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="an override for one stage (repeatable)",
    )
    p.add_argument(
        "--report-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a manipulate.py override for the main-job report's pipelines, e.g. "
        "editor.strength=0.6 (repeatable)",
    )
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every stage")
    args = p.parse_args(argv)
    args.preset = PRESETS[args.preset]
    root = Path(os.environ.get("SEMANI_ROOT", "."))
    args.pretrained_dir = args.pretrained_dir or root / args.preset.pretrained
    args.logs_dir = args.logs_dir or Path(args.preset.logs)
    for opt in ("data", "pretrained_dir", "logs_dir"):
        setattr(args, opt, getattr(args, opt).expanduser().resolve())
    if args.steps_scale <= 0:
        p.error("--steps-scale must be > 0")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.jobs is None:
        args.jobs = 1 if args.device == "cuda" else 2
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    for item in args.report_set:
        if "=" not in item:
            p.error(f"--report-set {item!r}: want KEY=VALUE, e.g. editor.strength=0.6")
    for item in args.set:
        if item.split(":", 1)[0] not in STAGE_BY_NAME or "=" not in item:
            p.error(f"--set {item!r}: want STAGE:KEY=VALUE with a stage of {list(STAGE_BY_NAME)}")
    only = args.only.split(",") if args.only else list(args.preset.stages)
    unknown = [n for n in only if n not in STAGE_BY_NAME]
    if unknown:
        p.error(f"unknown stage(s) {unknown}: the stages are {list(STAGE_BY_NAME)}")
    order = [n for n in args.preset.stages if n in only] + [
        n for n in only if n not in args.preset.stages
    ]
    args.stages = sorted((s for s in STAGES if s.name in only), key=lambda s: order.index(s.name))
    return args


def _table(rows: list[tuple[str, str, float, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{w}}  {'status':<10}  {'time':>8}  export"]
    lines += [f"{n:<{w}}  {s:<10}  {format_seconds(t):>8}  {p}" for n, s, t, p in rows]
    return "\n".join(lines)


def _last_progress(log_path: Path) -> str:
    """The last `progress:` line a stage's StepProgress wrote to its log ("" if none yet)."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 20000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln for ln in tail.replace("\r", "\n").splitlines() if ln.startswith(PROGRESS)]
    return lines[-1][len(PROGRESS) :].strip() if lines else ""


def run_plans(plans: list[Plan], args: argparse.Namespace, label: str = "") -> tuple[list, Any]:
    """Run the plans, up to `args.jobs` side by side, each as soon as the stages it reads are
    installed; print each command before it starts, a status line per running stage every
    30 s, and one line per finished stage. Returns (rows, failure or None)."""
    rows: list[tuple[str, str, float, str]] = []
    failed: tuple[str, str] | None = None
    pending = list(plans)
    done = {p.stage.name for p in plans if p.action == "skip"}
    for plan in plans:
        if plan.action == "skip":
            rows.append((plan.stage.name, "skipped", 0.0, _show(plan.dest)))
    pending = [p for p in pending if p.action != "skip"]
    running: dict[str, tuple[Plan, Any, float, Any]] = {}
    last_status = time.monotonic()
    while (pending or running) and failed is None:
        for plan in list(pending):
            if len(running) >= args.jobs:
                break
            if any(src not in done for src in plan.needs if src in {p.stage.name for p in plans}):
                continue
            pending.remove(plan)
            name, log_path = plan.stage.name, args.logs_dir / label / f"{plan.stage.name}.log"
            if plan.action == "install":
                install(plan.source, plan.dest)
                rows.append((name, "installed", 0.0, _show(plan.dest)))
                done.add(name)
                continue
            if plan.action == "train" and plan.run_dir.exists():
                prev = plan.run_dir.with_name(plan.run_dir.name + ".prev")
                _remove(prev)
                os.replace(plan.run_dir, prev)
            _write_record(plan.run_dir, plan.overrides, done=False)
            if label:  # the untrained twins: one line
                print(f"[{label} {name}] one step at learning rate 0; log: {_show(log_path)}",
                      flush=True)  # fmt: skip
            else:
                # as the user would type it here: paths below the working directory relative
                shown = shlex.join(plan.command()[2:]).replace(f"{Path.cwd()}/", "")
                print(f"[{name}] {plan.action} ({plan.why}); log: {_show(log_path)}\n"
                      f"  $ OMP_NUM_THREADS={_threads()} python train.py {shown}",
                      flush=True)  # fmt: skip
            proc, out = start_command(plan.command(), log_path)
            running[name] = (plan, proc, time.monotonic(), out)
        time.sleep(0.5)
        for name, (plan, proc, t0, out) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            out.close()
            del running[name]
            log_path = args.logs_dir / label / f"{name}.log"
            if rc == 0 and not plan.source.exists():
                rc, why = 1, f"finished without writing {_show(plan.source)}"
            else:
                why = "interrupted: rerun to resume" if rc == 130 else f"exit code {rc}"
            if rc != 0:
                rows.append((name, "failed", time.monotonic() - t0, _show(plan.dest)))
                failed = (name, f"{why}; log: {_show(log_path)}")
                continue
            _write_record(plan.run_dir, plan.overrides, done=True)
            install(plan.source, plan.dest)
            elapsed = time.monotonic() - t0
            status = {"train": "trained", "resume": "resumed"}[plan.action]
            print(
                f"[{label + ' ' if label else ''}{name}] {status} in "
                f"{format_seconds(elapsed)}; installed {_show(plan.dest)}",
                flush=True,
            )
            rows.append((name, status, elapsed, _show(plan.dest)))
            done.add(name)
        if running and time.monotonic() - last_status >= 30:
            last_status = time.monotonic()
            for name, (_, _, t0, _) in running.items():
                line = _last_progress(args.logs_dir / label / f"{name}.log") or "starting"
                print(
                    f"  {name}: {line} (stage {format_seconds(time.monotonic() - t0)}, "
                    f"all {format_seconds(time.monotonic() - args.t_start)})",
                    flush=True,
                )
    for _, (plan, proc, t0, out) in running.items():  # a failure: stop the others
        proc.terminate()
        proc.wait()
        out.close()
        rows.append((plan.stage.name, "stopped", time.monotonic() - t0, _show(plan.dest)))
    for plan in pending:
        rows.append((plan.stage.name, "not run", 0.0, _show(plan.dest)))
    return rows, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_cmd = [sys.executable, str(REPO / "scripts" / "make_shapes.py"), "--out",
                str(args.data), *DATA_ARGS]  # fmt: skip
    have_data = (args.data / "shapesworld.json").is_file()
    report = not args.no_report and set(args.preset.stages) <= {s.name for s in args.stages}
    plans = make_plans(args, args.stages)
    if args.dry_run:
        if not have_data:
            print(f"[data] make ShapesWorld\n  $ {shlex.join(data_cmd)}")
        for i, plan in enumerate(plans, 1):
            print(f"[{i}/{len(plans)}] {plan.stage.name}: {plan.action} ({plan.why})")
            if plan.action in ("train", "resume"):
                print(f"  $ OMP_NUM_THREADS={_threads()} {shlex.join(plan.command())}")
            if plan.action != "skip":
                print(f"  export: {plan.source} -> {plan.dest}")
            else:
                print(f"  export: {plan.dest}")
            print(f"  read by: {_consumers(plan.stage)}")
        if report:
            print(f"then the untrained twins and the {args.preset.report} report")
        return 0

    t_start = args.t_start = time.monotonic()
    rows: list[tuple[str, str, float, str]] = []
    failed: tuple[str, str] | None = None
    if not have_data:
        if args.data.exists() and any(args.data.iterdir()):
            raise SystemExit(f"shapes_models: {args.data} holds no complete ShapesWorld "
                             "(no shapesworld.json): remove it or pass --data")  # fmt: skip
        t0, data_log = time.monotonic(), args.logs_dir / "make_shapes.log"
        print(f"[data] making ShapesWorld in {_show(args.data)}", flush=True)
        rc = run_command(data_cmd, data_log)
        rows.append(("data", "made" if rc == 0 else "failed", time.monotonic() - t0,
                     _show(args.data)))  # fmt: skip
        if rc != 0:
            failed = ("data", f"make_shapes.py: exit code {rc}; log: {_show(data_log)}")
    if failed is None:
        more, failed = run_plans(plans, args)
        rows += more
    if failed is None and report:
        more, failed = run_plans(make_plans(args, args.stages, untrained=True), args, "untrained")
        rows += [(f"{n} (untrained)", *rest) for n, *rest in more]
    print(_table(rows))
    if failed is not None:
        print(f"shapes_models: stage {failed[0]} failed ({failed[1]})", file=sys.stderr)
        return 1
    if report:
        from semani.tasks import shapes_report

        make = getattr(shapes_report, f"{args.preset.report}_report")
        make(args, minutes_so_far=(time.monotonic() - t_start) / 60)
    return 0


def _named_loggers_only(record: logging.LogRecord) -> bool:
    """Drop the INFO lines libraries write through the root logger (open_clip's "Parsing
    model identifier ..."): the report's output stays its own."""
    return record.name != "root" or record.levelno >= logging.WARNING


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_named_loggers_only)
    sys.exit(main())
