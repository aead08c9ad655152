"""What `scripts/shapes_models.py` reports after training: the main job of `make quickstart`
(`main_job_report`) and the summary of `make shapes-models` (`summary_report`).

Both read the installed exports of a preset (`<pretrained>`) and of their untrained twins
(`<pretrained>/untrained`: the same stages, one step at learning rate 0), build the pipelines
the user's commands build (`EntityEditPipeline.from_config` on the `manipulate` config with
`method=<...>_shapes paths.pretrained_dir=<...>`) and measure them on the held-out test split.

The summary (`summary.md`, `summary.json`: the same numbers) has one row per figure: each
stage's own (`semani.evaluation.stage_figures`), both editors' pipelines on the main job, and
Table I (`eval.py protocol=table1`; untrained only for SeMani-Diff, scored by the trained
metrics' models), each with the trained and the untrained exports, its chance level where it
has one and the number of test images (or edits) it counts; `SUMMARY` lists them. A part whose
exports are not installed, or whose measurement fails, is left out with a note.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from semani.data.shapes import SHAPES
from semani.evaluation.main_job import NAMES, plan_main_job, run_main_job, write_report
from semani.evaluation.stage_figures import (
    classifier_accuracy,
    clip_recall,
    diff_figures,
    entityseg_recall,
    hydra_value,
    mask_prompt_accuracy,
    recall_candidates,
    repo_script,
    table1_row,
    trans_figures,
    vae_l1,
    vqgan_l1,
)
from semani.utils.atomic import write_text

log = logging.getLogger(__name__)

__all__ = [
    "SUMMARY",
    "build_pipeline",
    "main_job_report",
    "measure_summary",
    "shapes_test_set",
    "summary_report",
    "write_summary",
]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def compose_config(name: str, overrides: Sequence[str]) -> Any:
    """A config of configs/ as the entry point would compose it (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)  # ${hydra:...} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# the paper's selection (Eq. 1's argmax, as Table I) instead of manipulate.py's strict default,
# for what measures the method rather than the refusals: the main job's reports (every case
# names an entity that is there; scripts/check_not_found.py measures refusals), the latency
# bench, the paper smoke's random-weight photo edits
PAPER_SELECTION = ("alignment.threshold_mode=keep_best",)


def build_pipeline(method: str, pretrained: Path, overrides: Sequence[str] = ()) -> Any:
    """The `EntityEditPipeline` of `python manipulate.py method=<method>
    paths.pretrained_dir=<pretrained>` on the CPU (the weights' checks included)."""
    from semani.pipeline import EntityEditPipeline
    from semani.utils.weights import check_weights

    cfg = compose_config(
        "manipulate",
        [f"method={method}", f"paths.pretrained_dir={hydra_value(pretrained)}", "image=unused",
         "text=unused", "editor.device=cpu", *overrides],
    )  # fmt: skip
    check_weights(cfg)
    torch.manual_seed(0)
    return EntityEditPipeline.from_config(cfg)


def shapes_test_set(root: Path, image_size: int = 64) -> Any:
    """The held-out ShapesWorld test split (never trained on)."""
    from semani.data.shapes import ShapesWorldDataset

    return ShapesWorldDataset(root, "test", image_size=image_size, context_length=77)


def try_next(data: Path, pretrained: Path, key: str, word: str, text: str) -> list[str]:
    """The commands to try next: manipulate.py and the app on these models, then on real
    weights."""
    image = _here(data / "CUB_200_2011" / "images" / f"{key}.png")
    where = f"paths.pretrained_dir={shlex.quote(_here(pretrained))}"
    return [
        f"python manipulate.py method=semani_diff_shapes {where} \\",
        f"  image={shlex.quote(image)} entity={word} text={shlex.quote(text)} out=edits/",
        f"python -m semani.app method=semani_diff_shapes {where}   # http://127.0.0.1:7860",
        '# with the released weights (SD-2-inpainting, OVSeg; README, "Pretrained weights"):',
        "python scripts/download_weights.py --only sd2-inpainting,ovseg",
        'python manipulate.py image=photo.jpg entity=bird text="a blue bird" out=edits/',
    ]


def _here(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """`logger`'s INFO lines off inside the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


def _count(name: str, every: int = 25) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            print(f"  {name}: {done}/{total} edits", flush=True)

    return progress


def main_job_report(args: Any, minutes_so_far: float = 0.0) -> dict[str, Any]:
    """The quickstart's report (`semani.evaluation.main_job`) of the trained and the untrained
    SeMani-Diff pipelines into `<logs>/report.{md,json}` and `<logs>/edits.png`; printed."""
    t0 = time.monotonic()
    torch.set_num_threads(max(1, getattr(args, "jobs", 1)))  # the cores the stages had
    data = shapes_test_set(args.data)
    plan = plan_main_job(data, args.report_n, seed=0)
    extra = list(getattr(args, "report_set", []))  # manipulate.py overrides, e.g. strength
    rows = {}
    chance = {}
    for name, pretrained in (("trained", args.pretrained_dir),
                             ("untrained", args.pretrained_dir / "untrained")):  # fmt: skip
        print(f"[report] the main job with the {name} models on {len(plan)} held-out test "
              "images", flush=True)  # fmt: skip
        pipeline = build_pipeline("semani_diff_shapes", pretrained, [*PAPER_SELECTION, *extra])
        with quiet("semani.pipeline"):  # one line per edit: a count every 25 instead
            job = run_main_job(pipeline, data, plan, seed=0, progress=_count(name))
        rows[name] = job
        if name == "trained":
            cases = job.cases
            chance = {
                "alignment_accuracy": sum(c.chance_aligned for c in cases) / max(len(cases), 1),
                "colour_success": 1 / len(NAMES),
            }
    minutes = minutes_so_far + (time.monotonic() - t0) / 60
    i, _, word, colour = plan[0]
    text = rows["trained"].cases[0].text
    commands = try_next(args.data, args.pretrained_dir, data.keys[i], word, text)
    report = write_report(
        args.logs_dir, rows, chance, minutes,
        header="make quickstart: find the entity a word names, then recolour it (ShapesWorld)"
        + (f", with {' '.join(extra)}" if extra else ""),
        commands=commands,
    )  # fmt: skip
    print((args.logs_dir / "report.md").read_text(), flush=True)
    print(f"report: {args.logs_dir / 'report.md'} (and report.json, edits.png)", flush=True)
    return report


# ------------------------------------------------------------------------------ the summary


@dataclass
class Figure:
    """One number of one export: what, its value, over how many test images (or edits), and
    its chance level where it has one."""

    name: str
    value: float
    n: int
    chance: float | None = None


@dataclass
class Setting:
    """What every measurement of the summary shares."""

    data: Path  # the ShapesWorld root
    n: int  # test images (the first n of the split; Table I: of its seeded order)
    install: Mapping[str, str]  # stage -> its export under a pretrained dir
    trained: Path  # the trained models' pretrained dir (Table I's metrics read it)
    work: Path  # the Table-I runs and their logs
    _plan: list | None = field(default=None, init=False, repr=False)
    _dataset: Any = field(default=None, init=False, repr=False)

    def export(self, pretrained: Path, stage: str) -> Path:
        return pretrained / self.install[stage]

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            self._dataset = shapes_test_set(self.data)
        return self._dataset

    @property
    def plan(self) -> list:
        """The main job's cases (`plan_main_job`): the same for every pipeline."""
        if self._plan is None:
            self._plan = plan_main_job(self.dataset, self.n, seed=0)
        return self._plan


Measure = Callable[[Path, Setting], list[Figure]]


@dataclass(frozen=True)
class Part:
    """Rows of the summary: `measure(pretrained, setting)` of the exports of `needs` (each
    under the trained and, if `untrained`, the untrained pretrained dir)."""

    label: str
    needs: tuple[str, ...]
    measure: Measure
    untrained: bool = True


def alignment_config(pretrained: Path, method: str) -> Any:
    """The `alignment` node of `manipulate.py method=<method> paths.pretrained_dir=<...>`."""
    cfg = compose_config(
        "manipulate",
        [f"method={method}", f"paths.pretrained_dir={hydra_value(pretrained)}", "image=unused",
         "text=unused"],
    )  # fmt: skip
    return cfg.alignment


def _vqgan(pre: Path, s: Setting) -> list[Figure]:
    l1, n = vqgan_l1(s.export(pre, "vqgan_shapes"), s.data, s.n)
    return [Figure("reconstruction L1", l1, n)]


def _vae(pre: Path, s: Setting) -> list[Figure]:
    l1, n = vae_l1(s.export(pre, "vae_shapes"), s.data, s.n)
    return [Figure("reconstruction L1", l1, n)]


def _clip(pre: Path, s: Setting) -> list[Figure]:
    r1, n = clip_recall(s.export(pre, "clip_shapes"), s.data, s.n)
    return [Figure("caption R@1 image->text", r1["i2t"], n, 1 / max(n, 1)),
            Figure("caption R@1 text->image", r1["t2i"], n, 1 / max(n, 1))]  # fmt: skip


def _entityseg(pre: Path, s: Setting) -> list[Figure]:
    from semani.alignment import build_segmenter

    segmenter = build_segmenter(alignment_config(pre, "semani_diff_shapes").segmenter)
    found, n = entityseg_recall(segmenter, s.data, s.n)
    return [Figure("entity recall@0.5", found["recall"], n),
            Figure("proposals per image", found["proposals"], n)]  # fmt: skip


def _mask_prompt(pre: Path, s: Setting) -> list[Figure]:
    from semani.utils.instantiators import instantiate_unwrapped

    scorer = instantiate_unwrapped(alignment_config(pre, "semani_diff_shapes").scorer)
    accuracy, n = mask_prompt_accuracy(scorer, s.data, s.n)
    return [Figure("masked entity's shape named", accuracy, n, 1 / len(SHAPES))]


def _classifier(pre: Path, s: Setting) -> list[Figure]:
    accuracy, n, classes = classifier_accuracy(s.export(pre, "classifier_shapes"), s.data, s.n)
    return [Figure("accuracy", accuracy, n, 1 / classes)]


def _trans(pre: Path, s: Setting) -> list[Figure]:
    r = trans_figures(s.export(pre, "semani_trans_shapes"), s.data, s.n)
    return [
        Figure("colour recall", r["colour_recall"], r["images"], r["colour_recall_shuffled"]),
        Figure("recolouring success", r["edit_success"], r["edits"]),
        Figure(
            "recolouring success without vision guidance", r["edit_success_unguided"], r["edits"]
        ),
        Figure("caption NLL gain (nats)", r["caption_nll_gain"], r["images"], 0.0),
    ]


def _diff(pre: Path, s: Setting) -> list[Figure]:
    r = diff_figures(s.export(pre, "semani_diff_shapes"), s.data, s.n)
    return [Figure("colour success", r["colour_success"], r["n"], r["chance"])]


def _main_job(method: str) -> Measure:
    def measure(pre: Path, s: Setting) -> list[Figure]:
        job = run_main_job(build_pipeline(method, pre, PAPER_SELECTION), s.dataset, s.plan, seed=0)
        chance = sum(c.chance_aligned for c in job.cases) / max(job.n, 1)
        return [Figure("alignment accuracy (bare name)", job.alignment_accuracy, job.n, chance),
                Figure("colour success", job.colour_success, job.n, 1 / len(NAMES))]  # fmt: skip

    return measure


def table1_metrics(method: str, trained: Path) -> list[str]:
    """The overrides that score a Table-I run with the metrics' models (IS classifier, CLIP)
    of `trained`, whatever `paths.pretrained_dir` the run's method reads."""
    cfg = compose_config("eval", ["protocol=table1", "data=shapes", f"method={method}",
                                  f"paths.pretrained_dir={hydra_value(trained)}"])  # fmt: skip
    return [f"metrics.classifier.path={hydra_value(cfg.metrics.classifier.path)}",
            f"metrics.clip_pretrained={hydra_value(cfg.metrics.clip_pretrained)}"]  # fmt: skip


def _table1(method: str) -> Measure:
    def measure(pre: Path, s: Setting) -> list[Figure]:
        # every row is scored by the trained metrics' models
        extra = table1_metrics(method, s.trained) if pre != s.trained else []
        name = f"table1_{method}" + ("" if pre == s.trained else "_untrained")
        row = table1_row(method, pre, s.data, s.n, s.work / name, extra)
        n = int(row["n"])
        candidates = recall_candidates(s.dataset)
        figures = [Figure("IS", row["is_mean"], n), Figure("CLIP-score", row["clip_score"], n)]
        figures += [
            Figure(f"R@{k} (%)", row[f"r{k}"], n, 100 * k / candidates) for k in (1, 5, 10)
        ]
        figures += [Figure("L2 error", row["l2"], n),
                    Figure("entity not found", row["not_found"] / max(n, 1), n)]  # fmt: skip
        return figures

    return measure


_DIFF_PIPELINE = ("entityseg_shapes", "clip_shapes", "mask_prompt_shapes", "semani_diff_shapes")
_TRANS_PIPELINE = ("entityseg_shapes", "clip_shapes", "vqgan_shapes", "semani_trans_shapes")
# every stage's own figures, then the two editors' pipelines on the main job, then Table I
SUMMARY: tuple[Part, ...] = (
    Part("vqgan_shapes", ("vqgan_shapes",), _vqgan),
    Part("clip_shapes", ("clip_shapes",), _clip),
    Part("semani_trans_shapes", ("vqgan_shapes", "semani_trans_shapes"), _trans),
    Part("mask_prompt_shapes", ("clip_shapes", "mask_prompt_shapes"), _mask_prompt),
    Part("entityseg_shapes", ("entityseg_shapes",), _entityseg),
    Part("classifier_shapes", ("classifier_shapes",), _classifier),
    Part("vae_shapes", ("vae_shapes",), _vae),
    Part("semani_diff_shapes", ("semani_diff_shapes",), _diff),
    Part("main job, SeMani-Diff pipeline", _DIFF_PIPELINE, _main_job("semani_diff_shapes")),
    Part("main job, SeMani-Trans pipeline", _TRANS_PIPELINE, _main_job("semani_trans_shapes")),
    Part("Table I, SeMani-Diff", (*_DIFF_PIPELINE, "classifier_shapes"),
         _table1("semani_diff_shapes")),
    Part("Table I, SeMani-Trans", (*_TRANS_PIPELINE, "classifier_shapes"),
         _table1("semani_trans_shapes"), untrained=False),
    Part("Table I, Blended LDM", (*_DIFF_PIPELINE, "classifier_shapes"),
         _table1("blended_ldm_shapes"), untrained=False),
)  # fmt: skip


def _number(value: float | None) -> float | None:
    """4 significant digits (the Markdown shows exactly these; no -0)."""
    return None if value is None else float(f"{float(value):.4g}") + 0.0


def measure_summary(
    setting: Setting, untrained: Path | None, parts: Sequence[Part] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, notes): every part (default: `SUMMARY`) measured with the trained models
    (`setting.trained`) and, where the part has an untrained column, the untrained ones. A part
    whose exports are not installed is left out, and a measurement that fails is left empty,
    each with a note."""
    rows, notes = [], []
    for part in SUMMARY if parts is None else parts:
        unknown = [st for st in part.needs if st not in setting.install]
        if unknown:
            notes.append(f"{part.label}: left out, the stages {unknown} are not made by this run")
            continue
        results: dict[str, dict[str, Figure]] = {}
        trees = [("trained", setting.trained)]
        trees += [("untrained", untrained)] if part.untrained and untrained is not None else []
        for tree, pretrained in trees:
            missing = [st for st in part.needs if not setting.export(pretrained, st).exists()]
            if missing:
                where = setting.export(pretrained, missing[0])
                notes.append(f"{part.label}: no {tree} figures, {where} is not installed "
                             f"(make {', '.join(missing)} first)")  # fmt: skip
                if tree == "trained":
                    break  # nothing to compare the untrained figures with
                continue
            print(f"[summary] {part.label}: the {tree} models", flush=True)
            t0 = time.monotonic()
            try:
                figures = part.measure(pretrained, setting)
            except Exception as err:  # one failing measurement must not lose the others
                log.exception("summary: %s (%s) failed", part.label, tree)
                first = (str(err).strip().splitlines() or [""])[0]
                notes.append(f"{part.label}: the {tree} measurement failed: "
                             f"{type(err).__name__}: {first}")  # fmt: skip
                continue
            log.info("summary: %s (%s) in %.0f s", part.label, tree, time.monotonic() - t0)
            results[tree] = {f.name: f for f in figures}
        names = list(dict.fromkeys(name for r in results.values() for name in r))
        for name in names:
            got = {tree: r.get(name) for tree, r in results.items()}
            first = got.get("trained") or got.get("untrained")
            rows.append({
                "stage": part.label,
                "figure": name,
                "trained": _number(got["trained"].value) if got.get("trained") else None,
                "untrained": _number(got["untrained"].value) if got.get("untrained") else None,
                "chance": _number(first.chance),
                "n": int(first.n),
            })  # fmt: skip
    return rows, notes


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


LEGEND = (
    "n: what a figure averages over: test images (entities for the mask prompt, edits for "
    "SeMani-Trans' recolouring, scored images for Table I)",
    "reconstruction L1: mean |image - reconstruction|, images in [-1, 1] (the VQGAN at the "
    "size it was trained at, the VAE from its posterior mean)",
    "caption R@1: each test image's caption ranked first among the n test captions (and back)",
    "SeMani-Trans: `scripts/check_trans_shapes.py` (colour recall of images drawn from the "
    "caption, chance: another image's colours; recolouring success of the first entity; the "
    "caption's image-token NLL gain)",
    "mask prompt: each ground-truth entity mask scored for the 7 shape names, its own best",
    "entity recall@0.5: ground-truth entities found by a proposal with mask IoU >= 0.5",
    "classifier: the shape of each image's entity A (7 classes)",
    "SeMani-Diff: `scripts/check_diff_shapes.py` (the requested colour dominates the first "
    "entity's mask after the edit, its own mask given)",
    "main job: the pipeline of `manipulate.py method=<...>_shapes` finds the entity a bare "
    "shape name names (chosen mask IoU >= 0.5; chance: a uniform pick among the trained "
    "segmenter's proposals) and recolours it (`semani.evaluation.main_job`)",
    "Table I: `python eval.py protocol=table1 data=shapes method=<...>_shapes` on the first n "
    "images of its seeded order (IS, CLIP-score and R@N with the trained classifier and CLIP, "
    "also for the untrained row; R@N in %)",
)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: the table, the notes, where the numbers come from, and the legend."""
    lines = ["# make shapes-models: every ShapesWorld model against itself untrained", "",
             "| stage | figure | trained | untrained | chance | n |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary["rows"]:
        lines.append(f"| {r['stage']} | {r['figure']} | {_cell(r['trained'])} | "
                     f"{_cell(r['untrained'])} | {_cell(r['chance'])} | {r['n']} |")  # fmt: skip
    if summary["notes"]:
        lines += ["", "Notes:", "", *(f"- {note}" for note in summary["notes"])]
    dirty = " (uncommitted changes)" if summary.get("dirty") else ""
    lines += [
        "",
        f"Held-out ShapesWorld test split ({summary['data']}), the first {summary['report_n']} "
        f"images; untrained: the same stages, one step at learning rate 0. Commit "
        f"{summary.get('commit') or 'unknown'}{dirty}, {summary['date']}, "
        f"{summary['minutes']:.1f} minutes in all (the report: {summary['report_minutes']:.1f}).",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        *(f"- {line}" for line in LEGEND),
    ]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: Mapping[str, Any]) -> str:
    """`summary.json` and `summary.md` (the same numbers) in `out`, each written atomically;
    returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    markdown = summary_markdown(summary)
    write_text(out / "summary.md", markdown)
    return markdown


def git_state(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether tracked files differ from it); (None, None) without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=repo, capture_output=True, text=True, timeout=60,
                                check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head, bool(status.strip())


def _install_map(args: Any) -> dict[str, str]:
    """stage -> its export under a pretrained dir, from the script's `Stage`s."""
    stages = getattr(args, "stages", None) or repo_script("shapes_models").STAGES
    return {stage.name: stage.install for stage in stages}


def summary_report(args: Any, minutes_so_far: float = 0.0) -> dict[str, Any]:
    """`make shapes-models`' summary: each stage's own figures (`SUMMARY`) with the trained
    (`<pretrained>`) and the untrained (`<pretrained>/untrained`) exports on the first
    `args.report_n` held-out test images, into `<logs>/summary.{md,json}`; printed."""
    t0 = time.monotonic()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, getattr(args, "jobs", 1)))  # the cores the stages had
    setting = Setting(args.data, args.report_n, _install_map(args), args.pretrained_dir,
                      args.logs_dir / "summary")  # fmt: skip
    rows, notes = measure_summary(setting, args.pretrained_dir / "untrained")
    commit, dirty = git_state()
    report_minutes = (time.monotonic() - t0) / 60
    summary = {
        "rows": rows,
        "notes": notes,
        "data": str(args.data),
        "pretrained": str(args.pretrained_dir),
        "report_n": int(args.report_n),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "minutes": round(minutes_so_far + report_minutes, 1),
        "report_minutes": round(report_minutes, 1),
        "command": "python " + shlex.join(sys.argv),
    }
    markdown = write_summary(args.logs_dir, summary)
    print(markdown, flush=True)
    print(f"summary: {args.logs_dir / 'summary.md'} (and summary.json)", flush=True)
    return summary
