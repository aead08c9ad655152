"""Each ShapesWorld stage's own figure on the held-out test split (the first `n` images of
`ShapesWorldDataset(root, "test")`), one function per figure, on the CPU under seed 0, so that
a trained export and its untrained twin are measured by the same code
(`semani.tasks.shapes_report.summary_report` puts them side by side):

- `vqgan_l1`, `vae_l1`: mean absolute reconstruction error of the test images in [-1, 1]
  (VQGAN: the module's own `val/rec_loss` of an inference-only model, at the resolution it was
  trained at; VAE: decoded from the posterior mean, at 64 px);
- `clip_recall`: caption retrieval R@1 among the n test images and their captions (the
  deterministic caption of each), image -> text and text -> image, cosine of the pooled
  embeddings (chance 1 / n);
- `entityseg_recall`: the fraction of ground-truth entities (with a visible pixel) that some
  proposal of the segmenter matches with mask IoU >= 0.5 (`proposal_recall`, the training's
  `val/recall@0.5`), and the proposals per image;
- `mask_prompt_accuracy`: each ground-truth entity mask given to the scorer as the only
  proposal, scored for every shape name: the best one is the entity's (chance 1 / 7);
- `classifier_accuracy`: the IS classifier's accuracy on the image classes (the shape of each
  image's entity A, 7 classes);
- `trans_figures`, `diff_figures`: what `scripts/check_trans_shapes.py` and
  `scripts/check_diff_shapes.py` print (their `main`, called with `--n`);
- `table1_row`: `python eval.py protocol=table1 data=shapes method=<method>` on the first n
  images of the protocol's seeded order, the row of its `table1.csv`.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from semani.data.shapes import SHAPES, ShapesWorldDataset

log = logging.getLogger(__name__)

__all__ = [
    "classifier_accuracy",
    "clip_recall",
    "diff_figures",
    "entityseg_recall",
    "held_out_samples",
    "hydra_value",
    "mask_prompt_accuracy",
    "recall_candidates",
    "repo_script",
    "table1_command",
    "table1_row",
    "trans_figures",
    "vae_l1",
    "vqgan_l1",
]

REPO = Path(__file__).resolve().parents[2]
SHAPES_CLIP = "semani-shapes-ViT"
IOU = 0.5
BATCH = 16
TABLE1_NUMBERS = ("n", "not_found", "skipped", "is_mean", "is_std", "clip_score", "r1", "r5",
                  "r10", "l2")  # fmt: skip


def held_out_samples(root: Path, n: int, image_size: int = 64) -> tuple[Any, list[dict[str, Any]]]:
    """(the test split at `image_size`, its first `n` samples; captions deterministic)."""
    ds = ShapesWorldDataset(root, "test", image_size=image_size, context_length=77,
                            deterministic=True)  # fmt: skip
    return ds, [ds[i] for i in range(min(n, len(ds)))]


def _batches(samples: Sequence[dict[str, Any]], size: int = BATCH):
    for start in range(0, len(samples), size):
        yield torch.stack([s["image"] for s in samples[start : start + size]])  # (b, 3, H, W)


@torch.inference_mode()
def vqgan_l1(ckpt: Path, root: Path, n: int) -> tuple[float, int]:
    """(mean |x - VQGAN(x)| over the first n test images in [-1, 1], n) at the VQGAN's own
    training resolution (`ddconfig.resolution`)."""
    from semani.loading import load_model

    torch.manual_seed(0)
    model = load_model(ckpt)
    size = int(model.hparams.ddconfig.get("resolution", 64))
    _, samples = held_out_samples(root, n, size)
    total = 0.0
    for x in _batches(samples):
        total += float((x - model(x)[0]).abs().mean()) * len(x)
    return total / max(len(samples), 1), len(samples)


@torch.inference_mode()
def vae_l1(folder: Path, root: Path, n: int, image_size: int = 64) -> tuple[float, int]:
    """(mean |x - decode(mean of encode(x))| over the first n test images in [-1, 1], n)."""
    from semani.models.vae_module import load_vae

    torch.manual_seed(0)
    vae = load_vae(folder).eval()
    _, samples = held_out_samples(root, n, image_size)
    total = 0.0
    for x in _batches(samples):
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample  # (b, 3, H, W)
        total += float((x - rec).abs().mean()) * len(x)
    return total / max(len(samples), 1), len(samples)


@torch.inference_mode()
def clip_recall(
    path: Path, root: Path, n: int, model_name: str = SHAPES_CLIP
) -> tuple[dict[str, float], int]:
    """({"i2t": R@1 image -> text, "t2i": R@1 text -> image}, n) among the first n test images
    and their captions (pooled embeddings, cosine; ties count for the query)."""
    from semani.models.clip_module import recall_at_k
    from semani.modules.clip import ClipModel

    torch.manual_seed(0)
    clip = ClipModel(model_name, str(path))
    _, samples = held_out_samples(root, n)
    images = torch.cat([clip.encode_image(x) for x in _batches(samples)])  # (N, D)
    captions = [s["caption"] for s in samples]
    texts = torch.cat([clip.encode_text(captions[i : i + BATCH])
                       for i in range(0, len(captions), BATCH)])  # fmt: skip
    sim = images @ texts.T  # (N, N) [image, text]
    return {"i2t": recall_at_k(sim, (1,))[1], "t2i": recall_at_k(sim.T, (1,))[1]}, len(samples)


def _visible_entities(sample: Mapping[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """The ground-truth entity masks (K, H, W) bool with a visible pixel, and their names."""
    masks = sample["entity_masks"] > 0.5  # (K, H, W)
    keep = [k for k in range(len(masks)) if bool(masks[k].any())]
    return masks[keep], [sample["entity_names"][k] for k in keep]


@torch.inference_mode()
def entityseg_recall(segmenter: Any, root: Path, n: int) -> tuple[dict[str, float], int]:
    """({"recall": recall@0.5, "proposals": mean proposals per image}, n) of a segmenter
    (`segment(image, sample) -> EntityProposals`) on the first n test images."""
    from semani.alignment.segmenters.common import proposal_recall

    torch.manual_seed(0)
    _, samples = held_out_samples(root, n)
    hits = total = proposals = 0
    for sample in samples:
        found = segmenter.segment(sample["image"], sample)
        gt, _ = _visible_entities(sample)
        h, k = proposal_recall(found, gt, IOU)
        hits, total, proposals = hits + h, total + k, proposals + len(found)
    figures = {"recall": hits / max(total, 1), "proposals": proposals / max(len(samples), 1)}
    return figures, len(samples)


@torch.inference_mode()
def mask_prompt_accuracy(
    scorer: Any, root: Path, n: int, words: Sequence[str] = SHAPES
) -> tuple[float, int]:
    """(accuracy, entities): every ground-truth entity of the first n test images, its mask the
    only proposal, scored by `scorer(image, proposals, word)` for each of `words`; right when
    its own name scores best."""
    from semani.alignment.types import EntityProposals

    torch.manual_seed(0)
    _, samples = held_out_samples(root, n)
    right = total = 0
    for sample in samples:
        masks, names = _visible_entities(sample)
        if not len(masks):
            continue
        proposals = EntityProposals(masks, torch.ones(len(masks)))
        scores = torch.stack([scorer(sample["image"], proposals, w).float() for w in words])
        best = scores.nan_to_num(-torch.inf).argmax(0)  # (K,) the best word per entity
        right += sum(words[int(b)] == name for b, name in zip(best, names))
        total += len(names)
    return right / max(total, 1), total


@torch.inference_mode()
def classifier_accuracy(path: Path, root: Path, n: int) -> tuple[float, int, int]:
    """(accuracy, n, classes) of the ShapesWorld IS classifier on the first n test images (the
    class of an image: its key's "NNN.<shape>" folder)."""
    from semani.metrics.shapes_classifier import class_from_key, load_shapes_classifier

    torch.manual_seed(0)
    net = load_shapes_classifier(path)
    ds, samples = held_out_samples(root, n)
    labels = torch.tensor([class_from_key(ds.keys[i]) for i in range(len(samples))])
    logits = torch.cat([net(x) for x in _batches(samples)])  # (N, C)
    right = int((logits.argmax(1) == labels).sum())
    return right / max(len(samples), 1), len(samples), int(logits.shape[1])


# ------------------------------------------------------------------ the check scripts


def repo_script(name: str) -> ModuleType:
    """`scripts/<name>.py` of the repository, imported once (as `semani_scripts.<name>`)."""
    key = f"semani_scripts.{name}"
    if key not in sys.modules:
        path = REPO / "scripts" / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (the summary reads it)")
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def _run_check(main: Callable[[list[str]], dict], argv: list[str]) -> dict[str, Any]:
    """A check script's `main(argv)`; the JSON line it prints goes to the log instead."""
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    log.info("%s", out.getvalue().strip())
    return result


def trans_figures(ckpt: Path, root: Path, n: int) -> dict[str, Any]:
    """`python scripts/check_trans_shapes.py --ckpt <ckpt> --data <root> --n <n> --seed 0
    --unguided`: colour_recall (and _shuffled, its chance level), edit_success (and
    _unguided: without the grayscale tokens), caption_nll_gain, edits."""
    script = repo_script("check_trans_shapes")
    argv = ["--ckpt", str(ckpt), "--data", str(root), "--n", str(n), "--seed", "0",
            "--unguided"]  # fmt: skip
    return _run_check(script.main, argv)


def diff_figures(folder: Path, root: Path, n: int, steps: int | None = None) -> dict[str, Any]:
    """`python scripts/check_diff_shapes.py --model <folder> --data <root> --n <n> --seed 0`
    (its default sampler: DDIM 50 steps, guidance 7.5, the configured editor's): colour_success
    (chance 1 / 11), old_colour_kept, vae_ceiling, n."""
    script = repo_script("check_diff_shapes")
    argv = ["--model", str(folder), "--data", str(root), "--n", str(n), "--seed", "0"]
    argv += ["--steps", str(steps)] if steps is not None else []
    return _run_check(script.main, argv)


# ------------------------------------------------------------------ Table I


def hydra_value(value: Any) -> str:
    """A value as a Hydra override value (quoted when it holds characters Hydra parses)."""
    text = str(value)
    return text if re.fullmatch(r"[\w/.~+-]+", text) else "'" + text.replace("'", r"\'") + "'"


def recall_candidates(dataset: Any) -> int:
    """Table I's R@N candidates on a test split: the paper's 100, or half its captions when
    that is fewer (the others must differ from the target); R@k's chance is k / this."""
    return min(100, sum(len(c) for c in dataset.captions) // 2)


def table1_command(
    method: str, pretrained: Path, root: Path, n: int, out: Path, extra: Sequence[str] = ()
) -> list[str]:
    """`python eval.py protocol=table1 data=shapes method=<method> ...` on the CPU, the first
    `n` images of the seeded order, into `out`; IS splits and R@N candidates fit a small split."""
    ds = ShapesWorldDataset(root, "test", image_size=64, context_length=77)
    images = min(n, len(ds))
    return [
        sys.executable, str(REPO / "eval.py"), "protocol=table1", "data=shapes",
        f"method={method}", f"paths.pretrained_dir={hydra_value(pretrained)}",
        f"data.root={hydra_value(root)}", f"table1.max_images={images}",
        f"hydra.run.dir={hydra_value(out)}", "table1.device=cpu", "editor.device=cpu",
        "data.num_workers=0", f"metrics.is_splits={min(10, images)}",
        f"metrics.recall_candidates={recall_candidates(ds)}", "extras.print_config=false", *extra,
    ]  # fmt: skip


def table1_row(
    method: str,
    pretrained: Path,
    root: Path,
    n: int,
    out: Path,
    extra: Sequence[str] = (),
    timeout: float | None = None,
) -> dict[str, Any]:
    """The Table-I row (`table1.csv`: is_mean, is_std, clip_score, r1, r5, r10 in %, l2, n,
    not_found, ...) of `method` with the models under `pretrained`, run afresh in `out` (a run
    folder resumes, so an old one is removed first); `extra`: more overrides. The output goes
    to `<out>.log`; a failure raises naming it."""
    cmd = table1_command(method, pretrained, root, n, out, extra)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log_path.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=timeout).returncode  # fmt: skip
    table = out / "table1.csv"
    if rc != 0 or not table.is_file():
        raise RuntimeError(f"eval.py protocol=table1 method={method} failed (exit code {rc}); "
                           f"log: {log_path}")  # fmt: skip
    with table.open(newline="") as f:
        row = next(csv.DictReader(f))
    numbers = {k: float(row[k]) for k in TABLE1_NUMBERS if row.get(k) not in (None, "")}
    return {**row, **numbers}
