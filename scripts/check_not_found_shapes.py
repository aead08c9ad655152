"""How often is a word that names nothing in the image edited anyway? The false-edit rate of the
alignment phase on ShapesWorld, and the threshold that `threshold_mode=strict` needs.

    python scripts/check_not_found_shapes.py --models pretrained/quickstart --data data/shapes

For each held-out test image: a **present** word (the bare name of one of its entities, unique in
the image) and an **absent** word (a shape name no entity of the image has, seeded); the
pipeline of `manipulate.py method=<method> paths.pretrained_dir=<models>` proposes entities and
scores both words (`EntityAligner.score`), and the best similarity of each is kept. The first
`--n` images **calibrate** the threshold (the one with the best balanced accuracy: present words
at or above it, absent words under it); the next `--n` **measure**, with that threshold:

- ``false_edit_rate``: absent words whose best proposal reaches the threshold (edited anyway);
  under ``keep_best`` (the paper's argmax) every absent word is edited: 1.0;
- ``refused_present``: present words under the threshold (not found although there);
- ``aligned_present``: present words found whose best proposal has IoU >= 0.5 with the entity.

``--untrained`` measures the same for `<models>/untrained` (make quickstart's twins). Prints one
JSON line per model set.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from semani.alignment.segmenters.common import mask_iou
from semani.data.shapes_generator import SHAPES
from semani.tasks.shapes_report import build_pipeline, shapes_test_set

log = logging.getLogger("check_not_found_shapes")


def plan(dataset, start: int, n: int, seed: int) -> list[tuple[int, int, str, str]]:
    """(image index, entity index, present word, absent word) for images start .. start+n-1."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, min(start + n, len(dataset))):
        meta = json.loads((dataset.root / "entities" / f"{dataset.keys[i]}.json").read_text())
        names = [e["name"] for e in meta["entities"]]
        unique = [k for k, name in enumerate(names) if names.count(name) == 1]
        absent = [s for s in SHAPES if s not in names]
        if unique and absent:
            k = unique[int(rng.integers(len(unique)))]
            out.append((i, k, names[k], absent[int(rng.integers(len(absent)))]))
    return out


def best_scores(pipe, dataset, cases) -> list[dict]:
    """Per case: the present and absent words' best similarities, and whether the present
    word's best proposal is the entity (IoU >= 0.5)."""
    rows = []
    for i, k, present, absent in cases:
        sample = dataset[i]
        image = sample["image"]
        with torch.inference_mode():
            proposals = pipe.aligner.propose(image)
            row = {"index": i, "present": present, "absent": absent}
            table = torch.stack([pipe.aligner.score(image, proposals, w) for w in SHAPES])
            for kind, word in (("present", present), ("absent", absent)):
                sims = table[SHAPES.index(word)]
                ok = ~torch.isnan(sims)
                row[f"{kind}_best"] = float(sims[ok].max()) if ok.any() else float("-inf")
                # the vocabulary rule: the word's best proposal is, among every shape name, the
                # word's (an open-vocabulary classification of that proposal)
                if ok.any():
                    top = int(torch.nonzero(ok).flatten()[sims[ok].argmax()])
                    row[f"{kind}_top_class"] = SHAPES[int(table[:, top].argmax())] == word
                if kind == "present" and ok.any():
                    best = int(torch.nonzero(ok).flatten()[sims[ok].argmax()])
                    gt = sample["entity_masks"][k] > 0.5
                    iou = mask_iou(proposals.masks[best : best + 1].cpu(), gt[None])[0, 0]
                    row["present_aligned"] = bool(iou >= 0.5)
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


def measure(rows: list[dict], threshold: float) -> dict:
    n = len(rows)
    present = [r["present_best"] >= threshold for r in rows]
    return {
        "n": n,
        "false_edit_rate": round(sum(r["absent_best"] >= threshold for r in rows) / n, 3),
        "false_edit_rate_keep_best": round(
            sum(np.isfinite(r["absent_best"]) for r in rows) / n, 3
        ),
        "refused_present": round(1 - sum(present) / n, 3),
        "vocabulary_rule": {
            "false_edit_rate": round(sum(r.get("absent_top_class", False) for r in rows) / n, 3),
            "refused_present": round(
                1 - sum(r.get("present_top_class", False) for r in rows) / n, 3
            ),
        },
        "aligned_present": round(
            sum(p and r.get("present_aligned", False) for p, r in zip(present, rows)) / n, 3
        ),
    }


def run(method: str, models: Path, data: Path, n: int, seed: int) -> dict:
    pipe = build_pipeline(method, models)
    dataset = shapes_test_set(data)
    calibration = best_scores(pipe, dataset, plan(dataset, 0, n, seed))
    threshold = calibrate(calibration)
    held_out = best_scores(pipe, dataset, plan(dataset, n, n, seed + 1))
    return {
        "models": str(models),
        "method": method,
        "threshold": round(threshold, 4),
        "calibration": measure(calibration, threshold),
        "held_out": measure(held_out, threshold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("pretrained/quickstart"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--method", default="semani_diff_shapes")
    parser.add_argument("--n", type=int, default=100, help="images to calibrate, then measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untrained", action="store_true", help="also <models>/untrained")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    for models in [args.models] + ([args.models / "untrained"] if args.untrained else []):
        print(json.dumps(run(args.method, models, args.data, args.n, args.seed)), flush=True)


if __name__ == "__main__":
    main()
