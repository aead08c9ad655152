"""How often is a word that names nothing in the image edited anyway, and how often is a word
that names something refused? The not-found check of the alignment phase, on ShapesWorld or on
COCO with its instances, for any method as `manipulate.py` configures it.

    python scripts/check_not_found.py --models pretrained/quickstart --data data/shapes
    python scripts/check_not_found.py --method semani_diff --models pretrained --format coco \
        --data data/coco --instances data/coco/annotations/instances_val2014.json
    python scripts/check_not_found.py --app-shapes     # the app's ShapesWorld fallback

For each held-out test image: a **present** word (the name of one of its entities, unique in the
image) and an **absent** word (a name of the data set's vocabulary that no entity of the image
has: ShapesWorld's 7 shapes, COCO's 80 categories), both seeded; the pipeline of `manipulate.py
method=<method> paths.pretrained_dir=<models> <--set ...>` proposes entities and scores both
words (`EntityAligner.score`), and the best similarity of each is kept (`--app-shapes`: the
pipeline the app falls back to, `configs/app.yaml`'s `shapes` node). Then:

- **configured**: the rule `manipulate.py` applies as configured (the default `strict` with the
  scorer's threshold), on all 2 x `--n` images; **keep_best**: the paper's argmax on the same
  images (every absent word with a proposal is edited);
- **calibrated**: the threshold with the best balanced accuracy on the first `--n` images
  (present words at or above it, absent words under it), measured on the next `--n`; set it with
  `alignment.threshold=<value>` (or in the method's config).

Each reports ``false_edit_rate`` (absent words whose best proposal reaches the threshold: edited
anyway), ``refused_present`` (present words under it: not found although there) and
``aligned_present`` (present words found whose best proposal has IoU >= 0.5 with the entity);
``vocabulary_rule`` asks instead whether the word is, among the whole vocabulary, the best name
of its best proposal (an open-vocabulary classification, no threshold); ``named``: how often the
present word is its entity's best name on the entity's true mask and on that best proposal (what
bounds both rules). ``--untrained`` measures the same for `<models>/untrained` (make
quickstart's twins). Prints one JSON line per model set.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semani.alignment.segmenters.common import mask_iou
from semani.alignment.types import EntityProposals
from semani.data.shapes_generator import SHAPES
from semani.tasks.shapes_report import build_pipeline, shapes_test_set

log = logging.getLogger("check_not_found")

FORMATS = ("shapes", "coco")


def test_set(fmt: str, data: Path, instances: Path | None, image_size: int) -> tuple[Any, list]:
    """(the held-out split with entity masks and names, the vocabulary of absent words)."""
    if fmt == "shapes":
        return shapes_test_set(data, image_size), list(SHAPES)
    from semani.data.coco import COCODataset

    instances = instances or data / "annotations" / "instances_val2014.json"
    if not instances.is_file():
        raise FileNotFoundError(
            f"{instances} is missing: --format coco needs COCO's instances_val2014.json (pass "
            "--instances <file>)"
        )
    categories = json.loads(instances.read_text()).get("categories", [])
    vocabulary = sorted({c["name"] for c in categories})
    if len(vocabulary) < 2:
        raise ValueError(f"{instances} names {len(vocabulary)} categories; the check needs two")
    dataset = COCODataset(
        data, "test", image_size, context_length=77, deterministic=True, instances_json=instances
    )
    return dataset, vocabulary


def cases(
    dataset: Any, vocabulary: list[str], start: int, n: int, seed: int
) -> Iterator[tuple[int, dict, int, str, str]]:
    """(image index, its sample, entity index, present word, absent word) for images start ..
    start+n-1 that have an entity with a unique name and miss a vocabulary word; each image is
    read once."""
    rng = np.random.default_rng(seed)
    for i in range(start, min(start + n, len(dataset))):
        sample = dataset[i]
        names = list(sample.get("entity_names") or [])
        unique = [k for k, name in enumerate(names) if names.count(name) == 1]
        absent = [w for w in vocabulary if w not in names]
        if unique and absent:
            k = unique[int(rng.integers(len(unique)))]
            yield i, sample, k, names[k], absent[int(rng.integers(len(absent)))]


def plan(
    dataset: Any, vocabulary: list[str], start: int, n: int, seed: int
) -> list[tuple[int, int, str, str]]:
    """The (image index, entity index, present word, absent word) of `cases`."""
    return [(i, k, p, a) for i, _, k, p, a in cases(dataset, vocabulary, start, n, seed)]


def best_scores(pipe: Any, drawn: Iterable[tuple], vocabulary: list[str]) -> list[dict]:
    """Per case of `drawn` (`cases`): the present and absent words' best similarities, whether the
    present word's best proposal is the entity (IoU >= 0.5), and the vocabulary rule for both
    words."""
    rows = []
    for i, sample, k, present, absent in drawn:
        image = sample["image"]
        row: dict[str, Any] = {"index": i, "present": present, "absent": absent}
        with torch.inference_mode():
            proposals = pipe.aligner.propose(image)
            table = torch.stack([pipe.aligner.score(image, proposals, w) for w in vocabulary])
        for kind, word in (("present", present), ("absent", absent)):
            sims = table[vocabulary.index(word)]  # (K,)
            ok = ~torch.isnan(sims)
            row[f"{kind}_best"] = float(sims[ok].max()) if ok.any() else float("-inf")
            if not ok.any():
                continue
            top = int(torch.nonzero(ok).flatten()[sims[ok].argmax()])
            # the vocabulary rule: among every name, the word is its best proposal's best
            named = vocabulary[int(table[:, top].nan_to_num(-2).argmax())]
            row[f"{kind}_top_class"] = named == word
            if kind == "present":
                gt = sample["entity_masks"][k] > 0.5
                iou = mask_iou(proposals.masks[top : top + 1].cpu(), gt[None])[0, 0]
                row["present_aligned"] = bool(iou >= 0.5)
        # what bounds the rules: is the word its entity's best name on the entity's true mask?
        true = EntityProposals((sample["entity_masks"][k] > 0.5)[None], torch.ones(1))
        with torch.inference_mode():
            on_true = torch.stack([pipe.aligner.scorer(image, true, w) for w in vocabulary])
        row["present_named_on_true_mask"] = (
            vocabulary[int(on_true[:, 0].nan_to_num(-2).argmax())] == present
        )
        rows.append(row)
    return rows


def calibrate(rows: list[dict]) -> float:
    """The threshold with the best balanced accuracy on `rows` (midpoints between scores)."""
    pos = np.array([r["present_best"] for r in rows])
    neg = np.array([r["absent_best"] for r in rows])
    values = np.unique(np.concatenate([pos, neg]))
    values = values[np.isfinite(values)]
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values

    def balanced(t: float) -> float:
        return ((pos >= t).mean() + (neg < t).mean()) / 2

    return float(max(candidates, key=balanced))


def measure(rows: list[dict], threshold: float | None) -> dict:
    """The rates of `rows` when words under `threshold` are refused (None: keep_best, the best
    proposal is edited whatever its score)."""
    n = max(len(rows), 1)
    bar = -np.inf if threshold is None else threshold
    present = [np.isfinite(r["present_best"]) and r["present_best"] >= bar for r in rows]
    edited = [np.isfinite(r["absent_best"]) and r["absent_best"] >= bar for r in rows]
    return {
        "n": len(rows),
        "threshold": threshold,
        "false_edit_rate": round(sum(edited) / n, 3),
        "refused_present": round(1 - sum(present) / n, 3),
        "aligned_present": round(
            sum(p and r.get("present_aligned", False) for p, r in zip(present, rows)) / n, 3
        ),
        "vocabulary_rule": {
            "false_edit_rate": round(sum(r.get("absent_top_class", False) for r in rows) / n, 3),
            "refused_present": round(
                1 - sum(r.get("present_top_class", False) for r in rows) / n, 3
            ),
        },
        # the present word is its entity's best name among the vocabulary's, on the entity's
        # true mask and on the word's best proposal
        "named": {
            "true_mask": round(
                sum(r.get("present_named_on_true_mask", False) for r in rows) / n, 3
            ),
            "best_proposal": round(sum(r.get("present_top_class", False) for r in rows) / n, 3),
        },
    }


def app_shapes_pipeline(models: Path, overrides: list[str] = ()) -> Any:
    """The app's ShapesWorld fallback pipeline (`configs/app.yaml`, `shapes`) on `models`."""
    from semani.app import shapes_pipeline
    from semani.tasks.shapes_report import compose_config, hydra_value

    cfg = compose_config(
        "app", [f"paths.pretrained_dir={hydra_value(models)}", "shapes.editor.device=cpu",
                *overrides],
    )  # fmt: skip
    torch.manual_seed(0)
    return shapes_pipeline(cfg)


def run(
    method: str,
    models: Path,
    dataset: Any,
    vocabulary: list[str],
    n: int,
    seed: int,
    overrides: list[str] = (),
    app_shapes: bool = False,
) -> dict:
    if app_shapes:
        pipe, method = app_shapes_pipeline(models, overrides), "app (ShapesWorld fallback)"
    else:
        pipe = build_pipeline(method, models, overrides)
    calibration = best_scores(pipe, cases(dataset, vocabulary, 0, n, seed), vocabulary)
    held_out = best_scores(pipe, cases(dataset, vocabulary, n, n, seed + 1), vocabulary)
    threshold = calibrate(calibration)
    aligner = pipe.aligner
    strict = aligner.threshold_mode == "strict"
    configured = measure(calibration + held_out, aligner.threshold if strict else None)
    paper = measure(calibration + held_out, None)
    return {
        "models": str(models),
        "method": method,
        "overrides": list(overrides),
        "configured": {"threshold_mode": aligner.threshold_mode, **configured},
        "keep_best": {
            k: paper[k] for k in ("false_edit_rate", "refused_present", "aligned_present")
        },
        "calibrated": {
            "threshold": round(threshold, 4),
            "calibration": measure(calibration, threshold),
            "held_out": measure(held_out, threshold),
        },
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("pretrained/quickstart"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--format", choices=FORMATS, default="shapes")
    parser.add_argument("--instances", type=Path, default=None,
                        help="COCO's instances json (default <data>/annotations/"
                        "instances_val2014.json)")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None,
                        help="read images at this size (64 for shapes, 512 for coco)")  # fmt: skip
    parser.add_argument("--method", default="semani_diff_shapes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a manipulate.py override (repeatable)")  # fmt: skip
    parser.add_argument("--app-shapes", action="store_true",
                        help="the app's ShapesWorld fallback instead of --method")  # fmt: skip
    parser.add_argument("--n", type=int, default=100, help="images to calibrate, then measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untrained", action="store_true", help="also <models>/untrained")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    size = args.image_size or (64 if args.format == "shapes" else 512)
    dataset, vocabulary = test_set(args.format, args.data, args.instances, size)
    results = []
    for models in [args.models] + ([args.models / "untrained"] if args.untrained else []):
        result = run(args.method, models, dataset, vocabulary, args.n, args.seed, args.set,
                     args.app_shapes)  # fmt: skip
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
