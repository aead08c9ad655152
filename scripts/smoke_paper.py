"""Run every paper experiment once at full architecture size: `make smoke-paper`.

    python scripts/smoke_paper.py [--out logs/smoke_paper] [--only a,b,...] [--force]
        [--photo PATH] [--sampling-steps 2] [--diff-size 512] [--list]

What the released models would meet on a user's machine, before the released weights are at
hand: every component the paper configs read is written with seeded random weights at its
real size and in its real file layout under `<out>/pretrained` (`semani.evaluation.
smoke_weights`), data in the real CUB / COCO / CC12M layouts under `<out>/data`
(`semani.data.smoke_trees`), and then each paper command runs as a user types it, with
`paths.pretrained_dir` / `paths.data_dir` pointing there and only the overrides a smoke needs
(one step, batch 1, no DataLoader workers, CPU; see `STEPS`):

- one training step of `semani_trans_cc12m_pretrain`, `semani_trans_cub` (steps 1 and 2, each
  starting from the previous step's checkpoint, as the paper's chain) and `semani_diff_coco`;
- one image of Table I (`eval.py protocol=table1`) for SeMani-Trans on CUB, SeMani-Diff and
  Blended LDM on COCO, alignment included;
- one `manipulate.py` edit of a real photo (Gradio's bundled cheetah.jpg unless `--photo`)
  with each editor.

Each step is a subprocess (its log: `<out>/logs/<step>.log`); its wall time and peak resident
memory (the kernel's maximum RSS of that process) are recorded in `<out>/steps/<step>.json`
once it succeeds, so a rerun resumes after the last finished step (`--force`: all again). The
report `<out>/report.md` (and `.json`) is the table: step, seconds, peak memory, parameters
against the paper's (152M for SeMani-Trans' transformer, 866M for SeMani-Diff's UNet).

SeMani-Diff's Table I and edit read the export of the smoke's own fine-tuning step
(`editor.source=<run>/diffusers`, the paper chain), whose 16 GB checkpoint is then deleted
(`--keep-checkpoints` keeps it). Departures from the paper's commands (each printed with its
command): `trainer=cpu` (the experiments' bf16-mixed precision is kept), one step at batch 1;
the random segmenters' proposals all kept (`alignment.segmenter.threshold=0.0`: random weights
score every query low, and an entity must be found to be edited), and on the photo the paper's
argmax (`alignment.threshold_mode=keep_best`: random scorers score every word under the
strict default's threshold); SeMani-Trans' alignment with
Mask2Former proposals in Table I and OVSeg's on the photo (the paper's EntitySeg needs
detectron2, an optional backend; random Mask2Former masks on the photo are a few pixels, under
the token-wise scorer's 4 CLIP cells); diffusion sampling with `--sampling-steps` DDIM steps
(the paper's 50 would take most of an hour per image on 2 cores); `table1.max_images=1`,
`metrics.is_splits=1`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from semani.evaluation.stage_figures import hydra_value
from semani.tasks.shapes_report import PAPER_SELECTION

REPO = Path(__file__).resolve().parents[1]
PAPER_PARAMS = {"transformer": 152e6, "unet": 866e6}
# GB a step leaves on disk (measured at 2026-12-02); SeMani-Diff's 15.6 GB checkpoint exists
# until the step's end (`_diff_trained`)
DISK_GB = {
    "weights": 18.0,
    "semani_trans_cc12m_pretrain": 1.9,
    "semani_trans_cub": 1.9,
    "semani_trans_cub_step2": 1.9,
    "semani_diff_coco": 5.2,
}
DIFF_CHECKPOINT_GB = 15.6


def coco_instances(data: Path) -> str:
    """The `data.instances_json=` override of the generated COCO tree (both splits)."""
    ann = data / "coco" / "annotations"
    train, test = ann / "instances_train2014.json", ann / "instances_val2014.json"
    return f"data.instances_json={{train: {hydra_value(train)}, test: {hydra_value(test)}}}"


@dataclass(frozen=True)
class Step:
    """One smoke run. `command(ctx)`: its argv; `after(ctx)`: installs what later steps read
    (what it returns goes into the step's record); `needs`: the steps whose outputs it reads."""

    name: str
    what: str
    command: Callable[[Context], list[str]]
    needs: tuple[str, ...] = ()
    after: Callable[[Context], dict | None] | None = None


@dataclass
class Context:
    out: Path
    photo: Path
    sampling_steps: int
    diff_size: int
    keep_checkpoints: bool = False
    python: str = sys.executable

    @property
    def pretrained(self) -> Path:
        return self.out / "pretrained"

    @property
    def data(self) -> Path:
        return self.out / "data"

    def run_dir(self, step: str) -> Path:
        return self.out / "runs" / step

    def common(self, step: str) -> list[str]:
        """The overrides every Hydra command of the smoke takes: the smoke's folders."""
        return [
            f"paths.pretrained_dir={hydra_value(self.pretrained)}",
            f"paths.data_dir={hydra_value(self.data)}",
            f"paths.log_dir={hydra_value(self.out / 'logs')}",
            f"hydra.run.dir={hydra_value(self.run_dir(step))}",
        ]


def _internal(what: str) -> Callable[[Context], list[str]]:
    return lambda c: [
        c.python,
        str(Path(__file__).resolve()),
        "--internal",
        what,
        "--out",
        str(c.out),
    ]


TRAIN_SMOKE = [
    "trainer=cpu",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "data.batch_size=1",
    "data.num_workers=0",
    "data.pin_memory=false",
    "callbacks.image_logger=null",
]


def _train(experiment: str, *extra: str) -> Callable[[Context], list[str]]:
    def command(c: Context) -> list[str]:
        return [
            c.python,
            "train.py",
            f"experiment={experiment}",
            *TRAIN_SMOKE,
            *extra,
            *c.common(experiment),
        ]

    return command


def _last_ckpt(c: Context, step: str) -> Path:
    return c.run_dir(step) / "checkpoints" / "last.ckpt"


def _install(src_step: str, dest: str) -> Callable[[Context], None]:
    def after(c: Context) -> None:  # through a temporary name: no half-written file
        target = c.pretrained / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(_last_ckpt(c, src_step), tmp)
        os.replace(tmp, target)

    return after


def _size_gb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e9, 2)


def _diff_export(c: Context) -> Path:
    """SeMani-Diff's fine-tuned export, the `editor.source` of its Table I and edit."""
    return c.run_dir("semani_diff_coco") / "diffusers"


def _diff_trained(c: Context) -> dict:
    """Record the sizes of the fine-tuning's checkpoint (UNet, EMA and AdamW states: ~16 GB)
    and export; drop the checkpoint unless `--keep-checkpoints` (disk)."""
    ckpt = _last_ckpt(c, "semani_diff_coco")
    sizes = {"checkpoint_gb": _size_gb(ckpt), "export_gb": _size_gb(_diff_export(c))}
    if not c.keep_checkpoints:
        ckpt.unlink()
    return sizes


def _cub_step2(c: Context) -> list[str]:
    return [
        c.python,
        "train.py",
        "experiment=semani_trans_cub",
        "finetune=step2",
        f"step1_ckpt={hydra_value(_last_ckpt(c, 'semani_trans_cub'))}",
        *TRAIN_SMOKE,
        *c.common("semani_trans_cub_step2"),
    ]


def _diff_train(c: Context) -> list[str]:
    return [
        c.python,
        "train.py",
        "experiment=semani_diff_coco",
        *TRAIN_SMOKE,
        f"data.image_size={c.diff_size}",
        coco_instances(c.data),
        *c.common("semani_diff_coco"),
    ]


def _table1(method: str, data: str, *extra: str) -> Callable[[Context], list[str]]:
    def command(c: Context) -> list[str]:
        steps = [f"editor.steps={c.sampling_steps}"] if method != "semani_trans" else []
        inst = [coco_instances(c.data)] if data == "coco" else []
        return [
            c.python,
            "eval.py",
            "protocol=table1",
            f"method={method}",
            f"data={data}",
            "table1.max_images=1",
            "table1.batch_size=1",
            "metrics.is_splits=1",
            "data.num_workers=0",
            ANY_PROPOSAL,
            *inst,
            *steps,
            *extra,
            *c.common(f"table1_{method}_{data}"),
        ]

    return command


def _edit(method: str, *extra: str) -> Callable[[Context], list[str]]:
    def command(c: Context) -> list[str]:
        steps = [f"editor.steps={c.sampling_steps}"] if method != "semani_trans" else []
        return [
            c.python,
            "manipulate.py",
            f"method={method}",
            f"image={hydra_value(c.photo)}",
            "entity=cat",
            "text=a snow leopard",
            ANY_PROPOSAL,
            *PAPER_SELECTION,  # random scorers are under every threshold: Eq. 1's argmax
            *steps,
            *extra,
            f"out={hydra_value(c.run_dir('edit_' + method) / 'edits')}",
            *c.common("edit_" + method),
        ]

    return command


TRANS_ALIGNMENT = "alignment/segmenter=mask2former"
# on the photo, random Mask2Former weights propose masks of a few pixels, under the token-wise
# scorer's 4 CLIP cells: the photo edit takes the other class-agnostic proposals, OVSeg's
PHOTO_TRANS_ALIGNMENT = "alignment/segmenter=ovseg"
# random segmenter weights score every query low: keep all, so that an entity is found and
# edited (the released models' proposals pass the configs' thresholds)
ANY_PROPOSAL = "alignment.segmenter.threshold=0.0"
STEPS: tuple[Step, ...] = (
    Step(
        "weights",
        "every paper weight, random, at full size (semani.evaluation.smoke_weights)",
        _internal("weights"),
    ),
    Step(
        "data",
        "CUB, COCO and CC12M layouts of generated scenes (semani.data.smoke_trees)",
        _internal("data"),
    ),
    Step(
        "semani_trans_cc12m_pretrain",
        "SeMani-Trans pre-training, one step",
        _train(
            "semani_trans_cc12m_pretrain",
            "data.shards='{00000..00001}.tar'",
            "data.val_max_samples=1",
        ),
        needs=("weights", "data"),
        after=_install("semani_trans_cc12m_pretrain", "semani_trans_cc12m.ckpt"),
    ),
    Step(
        "semani_trans_cub",
        "SeMani-Trans fine-tuning step 1 (from the pre-training), one step",
        _train("semani_trans_cub"),
        needs=("semani_trans_cc12m_pretrain",),
    ),
    Step(
        "semani_trans_cub_step2",
        "SeMani-Trans fine-tuning step 2 (from step 1), one step",
        _cub_step2,
        needs=("semani_trans_cub",),
        after=_install("semani_trans_cub_step2", "semani_trans_cub/last.ckpt"),
    ),
    Step(
        "semani_diff_coco",
        "SeMani-Diff fine-tuning of SD-2-inpainting, one step",
        _diff_train,
        needs=("weights", "data"),
        after=_diff_trained,
    ),
    Step(
        "table1_semani_trans_cub",
        "Table I, SeMani-Trans on CUB, one image",
        _table1("semani_trans", "cub", TRANS_ALIGNMENT),
        needs=("semani_trans_cub_step2",),
    ),
    Step(
        "table1_semani_diff_coco",
        "Table I, SeMani-Diff on COCO, one image",
        lambda c: _table1("semani_diff", "coco", f"editor.source={hydra_value(_diff_export(c))}")(
            c
        ),
        needs=("semani_diff_coco",),
    ),
    Step(
        "table1_blended_ldm_coco",
        "Table I, Blended LDM on COCO, one image",
        _table1("blended_ldm", "coco"),
        needs=("weights", "data"),
    ),
    Step(
        "edit_semani_diff",
        "manipulate.py, SeMani-Diff, a real photo",
        lambda c: _edit("semani_diff", f"editor.source={hydra_value(_diff_export(c))}")(c),
        needs=("semani_diff_coco",),
    ),
    Step(
        "edit_semani_trans",
        "manipulate.py, SeMani-Trans, a real photo",
        lambda c: _edit(
            "semani_trans",
            PHOTO_TRANS_ALIGNMENT,
            f"editor.ckpt={hydra_value(c.pretrained / 'semani_trans_cub/last.ckpt')}",
        )(c),
        needs=("semani_trans_cub_step2",),
    ),
    Step(
        "edit_blended_ldm",
        "manipulate.py, Blended LDM, a real photo",
        _edit("blended_ldm"),
        needs=("weights",),
    ),
)


# ---------------------------------------------------------------------------------------------
# the steps run in this script (`--internal`)


def make_weights(out: Path) -> None:
    from semani.evaluation.smoke_weights import build_paper_weights

    build_paper_weights(out / "pretrained")


def make_data(out: Path) -> None:
    from semani.data.smoke_trees import write_coco, write_cub, write_webdataset

    # test splits hold >= 100 captions: R@N ranks each edit's caption among 100 (Table I)
    write_cub(out / "data" / "birds", n_train=4, n_test=12, size=256)
    write_coco(out / "data" / "coco", n_train=4, n_test=21, size=512)
    write_webdataset(out / "data" / "cc12m", size=256)


INTERNAL = {"weights": make_weights, "data": make_data}


# ---------------------------------------------------------------------------------------------
# running


def run_step(step: Step, ctx: Context) -> dict:
    """Run one step as a subprocess, output to its log; its record (rc, seconds, peak RSS)."""
    cmd = step.command(ctx)
    log_path = ctx.out / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ctx.run_dir(step.name), ignore_errors=True)  # a run again starts afresh
    print(f"[{step.name}] $ {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    t0 = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    record = {
        "step": step.name,
        "what": step.what,
        "command": shlex.join(cmd),
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss: KiB on Linux
        "log": str(log_path),
    }
    if proc.returncode == 0 and step.after is not None:
        record.update(step.after(ctx) or {})
    return record


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def count_params(ckpt: Path) -> dict[str, int]:
    """Parameters of a SeMani-Trans Lightning checkpoint by top-level module (gpt, vqgan, clip)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    counts: dict[str, int] = {}
    for key, value in state.items():
        top = key.split(".")[0]
        counts[top] = counts.get(top, 0) + value.numel()
    return counts


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def write_report(ctx: Context, records: list[dict]) -> str:
    weights_json = ctx.pretrained / "SMOKE_WEIGHTS.json"
    weights = json.loads(weights_json.read_text()) if weights_json.is_file() else {}
    params: list[tuple[str, int, str]] = []
    for name, info in weights.items():
        for part, n in info.get("params", {}).items():
            paper = _m(PAPER_PARAMS["unet"]) if name == "sd2-inpainting" and part == "unet" else ""
            params.append((f"{name}: {part}", n, paper))
    ckpt = ctx.pretrained / "semani_trans_cub" / "last.ckpt"
    if ckpt.is_file():
        for part, n in count_params(ckpt).items():
            paper = _m(PAPER_PARAMS["transformer"]) if part == "gpt" else ""
            params.append((f"SeMani-Trans (CUB step 2): {part}", n, paper))
    lines = [
        "| step | seconds | peak memory (GB) | result |",
        "|---|---|---|---|",
    ]
    for r in records:
        result = (
            "ok"
            if r["rc"] == 0
            else ("not run: " + r["reason"] if r["rc"] is None else f"failed (rc {r['rc']})")
        )
        seconds = "" if r["rc"] is None else f"{r['seconds']:.0f}"
        peak = "" if r["rc"] is None else f"{r['peak_rss_gb']:.1f}"
        lines.append(f"| {r['step']} | {seconds} | {peak} | {result} |")
    lines += ["", "| component | parameters | paper |", "|---|---|---|"]
    lines += [f"| {name} | {_m(n)} | {paper} |" for name, n, paper in params]
    text = "\n".join(lines) + "\n"
    (ctx.out / "report.md").write_text(text)
    (ctx.out / "report.json").write_text(
        json.dumps({"steps": records, "params": {n: c for n, c, _ in params}}, indent=1)
    )
    return text


def check_disk(out: Path, steps: Sequence[str], keep_checkpoints: bool) -> None:
    """Refuse to start when the folder's disk cannot hold what the steps to run will write."""
    need = sum(DISK_GB.get(name, 0.1) for name in steps)
    if "semani_diff_coco" in steps:
        need += DIFF_CHECKPOINT_GB
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free / 1e9
    if free < need:
        kept = " (with --keep-checkpoints it stays)" if keep_checkpoints else ""
        raise SystemExit(
            f"error: the steps to run write up to {need:.0f} GB under {out} (the weights 18 GB, "
            f"SeMani-Diff's checkpoint 16 GB while its step runs{kept}), but only {free:.0f} GB "
            "is free there: pass --out <a folder on a disk with room>, or --only <fewer steps>"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "logs" / "smoke_paper")
    p.add_argument("--only", default=None, help="comma-separated step names (see --list)")
    p.add_argument("--force", action="store_true", help="run finished steps again")
    p.add_argument("--photo", type=Path, default=None, help="the photo manipulate.py edits")
    p.add_argument(
        "--sampling-steps", type=int, default=2, help="DDIM steps of the diffusion edits"
    )
    p.add_argument("--diff-size", type=int, default=512, help="SeMani-Diff's training image side")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep SeMani-Diff's training checkpoint (~16 GB)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="print the steps and their commands")
    p.add_argument("--internal", choices=sorted(INTERNAL), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def default_photo() -> Path:
    """A real photo that ships with the app's dependency (Gradio): a 502x343 cheetah."""
    try:
        from gradio.media import get_image
    except ImportError as e:
        raise SystemExit(
            "error: no photo: pass --photo <a .jpg> (or pip install -e '.[app]')"
        ) from e
    return Path(get_image("cheetah.jpg"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    if args.internal:
        INTERNAL[args.internal](out)
        return 0
    ctx = Context(
        out, (args.photo or default_photo()).resolve(), args.sampling_steps, args.diff_size
    )
    names = [s.name for s in STEPS]
    only = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SystemExit(f"error: unknown step(s) {unknown}; the steps: {', '.join(names)}")
    if args.list:
        for s in STEPS:
            print(f"{s.name}: {s.what}\n  $ {shlex.join(s.command(ctx))}")
        return 0
    done_dir = out / "steps"
    todo = [n for n in only if args.force or not (done_dir / f"{n}.json").is_file()]
    check_disk(out, todo, args.keep_checkpoints)
    done_dir.mkdir(parents=True, exist_ok=True)
    records, failed = [], set()
    t0 = time.perf_counter()
    for step in STEPS:
        done = done_dir / f"{step.name}.json"
        if step.name not in only:
            if done.is_file():
                records.append(json.loads(done.read_text()))
            continue
        if done.is_file() and not args.force:
            print(f"[{step.name}] done earlier ({done})", flush=True)
            records.append(json.loads(done.read_text()))
            continue
        missing = [n for n in step.needs if n in failed or not (done_dir / f"{n}.json").is_file()]
        if missing:
            failed.add(step.name)
            records.append(
                {"step": step.name, "rc": None, "reason": f"needs {', '.join(missing)}"}
            )
            print(f"[{step.name}] skipped: needs {', '.join(missing)}", flush=True)
            continue
        record = run_step(step, ctx)
        records.append(record)
        print(
            f"[{step.name}] rc {record['rc']}, {record['seconds']:.0f} s, "
            f"peak {record['peak_rss_gb']:.1f} GB",
            flush=True,
        )
        if record["rc"] == 0:
            done.write_text(json.dumps(record, indent=1))
        else:
            failed.add(step.name)
            print(_tail(Path(record["log"])), flush=True)
    print(write_report(ctx, records))
    print(f"{(time.perf_counter() - t0) / 60:.1f} minutes; report: {out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
