"""The main job, measured: find the entity a bare word names, then recolour it, on ShapesWorld.

For each of the first `n` held-out test images, an entity whose shape name is unique in the
image is named by that bare word ("circle") and given a new colour ("a blue circle", the colour
drawn, seeded, among the palette colours the image does not use); `semani.EntityEditPipeline`
does the whole edit as `manipulate.py` and the app do (proposals, scores, chosen mask, edit; no
mask given by hand). Per edit:

- **alignment**: the chosen mask has IoU >= 0.5 with the named entity's ground-truth mask;
- **colour success**: inside that ground-truth mask, the most frequent nearest palette colour of
  the edited image is the requested one (the rule of `scripts/check_diff_shapes.py`); an entity
  that was not found, or not edited, keeps its colour and fails;
- **outside changed**: pixels outside the chosen mask that differ from the input (0 when the
  editor keeps the background).

`chance` is what a uniform pick among the trained segmenter's proposals would align (the mean
fraction of proposals with IoU >= 0.5 with the named entity) and a random palette colour
(1 / the palette's size). `run_main_job` returns the numbers and an `edits.png` grid (input |
chosen mask | edit, captioned with word and text); `write_report` writes `report.md` and
`report.json` with the same numbers, and `cases.csv` with every edit they are counted from.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from semani.alignment.segmenters.common import mask_iou
from semani.alignment.types import EntityNotFoundError
from semani.data.shapes_generator import COLORS, with_article
from semani.data.transforms import to_uint8
from semani.manipulation.pixels import overlay
from semani.utils.atomic import save_image, write_text

log = logging.getLogger(__name__)

__all__ = ["Case", "MainJob", "run_main_job", "write_report"]

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (C, 3) 0..255
NAMES = list(COLORS)
IOU = 0.5


@dataclass
class Case:
    """One edit of the main job and what came of it."""

    index: int  # in the test split
    word: str  # the bare shape name
    text: str  # "a blue circle"
    colour: str  # the requested colour
    aligned: bool = False
    success: bool = False
    outside_changed: int = 0
    chance_aligned: float = 0.0  # a uniform pick among the proposals
    proposals: int = 0
    # what limits it: a proposal matches the entity (IoU >= 0.5); the scorer, given the
    # true entity masks as its proposals, picks the named one; the entity's own colour
    # survives the editor's autoencoder alone (None: the editor has no VAE)
    recalled: bool = False
    scorer_on_truth: bool = False
    autoencoder_kept: bool | None = None
    error: str | None = None
    images: tuple | None = field(default=None, repr=False)  # (input, mask, edit) for the grid


@dataclass
class MainJob:
    """The numbers of one pipeline on the main job."""

    alignment_accuracy: float
    colour_success: float
    outside_changed_pixels: int
    n: int
    seconds: float
    cases: list[Case] = field(default_factory=list, repr=False)

    def numbers(self) -> dict[str, float]:
        return {"alignment_accuracy": round(self.alignment_accuracy, 4),
                "colour_success": round(self.colour_success, 4),
                "outside_changed_pixels": int(self.outside_changed_pixels),
                "n": self.n, "seconds": round(self.seconds, 1),
                "limits": self.limits()}  # fmt: skip

    def limits(self) -> dict[str, float | None]:
        """The parts' ceilings (see `Case`): proposal recall of the named entity, the scorer's
        accuracy on the true masks, the autoencoder's colour ceiling (None without one)."""
        n = max(len(self.cases), 1)
        kept = [c.autoencoder_kept for c in self.cases if c.autoencoder_kept is not None]
        return {
            "proposal_recall": round(sum(c.recalled for c in self.cases) / n, 4),
            "scorer_on_true_masks": round(sum(c.scorer_on_truth for c in self.cases) / n, 4),
            "autoencoder_ceiling": round(sum(kept) / len(kept), 4) if kept else None,
        }


def dominant_colour(pixels: np.ndarray) -> str:
    """The palette colour most of (N, 3) uint8 pixels are nearest to (RGB distance)."""
    d = ((pixels[:, None, :].astype(np.float32) - PALETTE[None]) ** 2).sum(-1)  # (N, C)
    return NAMES[int(np.bincount(d.argmin(1), minlength=len(NAMES)).argmax())]


def plan_main_job(dataset: Any, n: int, seed: int = 0) -> list[tuple[int, int, str, str]]:
    """(image index, entity index, word, colour) for the first `n` test images that have an
    entity with a unique shape name: that entity (seeded pick), a new colour (seeded, unused in
    the image)."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(len(dataset)):
        if len(plan) == n:
            break
        meta = json.loads((dataset.root / "entities" / f"{dataset.keys[i]}.json").read_text())
        ents = meta["entities"]
        names = [e["name"] for e in ents]
        unique = [k for k, e in enumerate(ents) if names.count(e["name"]) == 1]
        if not unique:
            continue
        k = unique[int(rng.integers(len(unique)))]
        free = [c for c in NAMES if c not in {e["color"] for e in ents}]
        plan.append((i, k, names[k], str(free[int(rng.integers(len(free)))])))
    return plan


def run_main_job(
    pipeline: Any,
    dataset: Any,
    plan: Sequence[tuple[int, int, str, str]],
    seed: int = 0,
    keep_images: int = 8,
    progress: Callable[[int, int], None] | None = None,
    **sampler: Any,
) -> MainJob:
    """Run `pipeline` on every case of `plan` (see the module docstring); `sampler` goes to
    the edits (e.g. `steps=`); `progress(done, total)` after each case."""
    t0 = time.perf_counter()
    cases = []
    for j, (i, k, word, colour) in enumerate(plan):
        sample = dataset[i]
        image = to_uint8(sample["image"]).permute(1, 2, 0).numpy()  # (H, W, 3)
        gt = sample["entity_masks"][k] > 0.5  # (H, W)
        text = with_article(f"{colour} {word}")
        case = Case(i, word, text, colour)
        meta = json.loads((dataset.root / "entities" / f"{dataset.keys[i]}.json").read_text())
        _limits(case, pipeline, sample, k, meta["entities"][k]["color"])
        try:
            result = pipeline(Image.fromarray(image), text, entity=word, seed=seed + i,
                              **sampler)  # fmt: skip
        except EntityNotFoundError as err:
            case.error = " ".join(str(err).split())
            if err.proposals is not None and len(err.proposals):
                ious = mask_iou(err.proposals.masks.cpu(), gt[None])[:, 0]
                case.proposals = len(ious)
                case.chance_aligned = float((ious >= IOU).float().mean())
                case.recalled = bool((ious >= IOU).any())
            cases.append(case)
            if progress is not None:
                progress(len(cases), len(plan))
            continue
        chosen = torch.from_numpy(result.mask)
        edited = np.asarray(result.image)
        case.aligned = bool(mask_iou(chosen[None], gt[None])[0, 0] >= IOU)
        case.success = dominant_colour(edited[gt.numpy()]) == colour
        case.outside_changed = int((edited[~result.mask] != image[~result.mask]).any(-1).sum())
        ious = mask_iou(result.proposals.masks.cpu(), gt[None])[:, 0]
        case.proposals, case.chance_aligned = len(ious), float((ious >= IOU).float().mean())
        case.recalled = bool((ious >= IOU).any())
        if j < keep_images:
            case.images = (image, result.mask, edited)
        cases.append(case)
        if progress is not None:
            progress(len(cases), len(plan))
    n = max(len(cases), 1)
    return MainJob(
        alignment_accuracy=sum(c.aligned for c in cases) / n,
        colour_success=sum(c.success for c in cases) / n,
        outside_changed_pixels=sum(c.outside_changed for c in cases),
        n=len(cases),
        seconds=time.perf_counter() - t0,
        cases=cases,
    )


def _limits(case: Case, pipeline: Any, sample: Mapping[str, Any], k: int, own: str) -> None:
    """The parts' own ceilings on this case: the scorer on the true masks, the autoencoder's
    round trip of the entity's colour `own` (`autoencode(image)` of the editor, when it has
    one)."""
    from semani.alignment.types import EntityProposals

    masks = sample["entity_masks"] > 0.5  # (E, H, W)
    truth = EntityProposals(masks, torch.ones(len(masks)))
    with torch.inference_mode():
        sims = pipeline.aligner.score(sample["image"], truth, case.word)
        case.scorer_on_truth = int(torch.nan_to_num(sims, nan=-1e9).argmax()) == k
        autoencode = getattr(pipeline.editor, "autoencode", None)
        if autoencode is not None:
            again = np.asarray(autoencode(sample["image"]))  # (H, W, 3) uint8
            case.autoencoder_kept = dominant_colour(again[masks[k].numpy()]) == own


def edits_grid(cases: Sequence[Case], tile: int = 96) -> Image.Image:
    """input | chosen mask (tinted) | edit, one row per case with images, captioned."""
    rows = [c for c in cases if c.images is not None]
    head, cap = 14, 14
    grid = Image.new("RGB", (3 * tile, head + max(len(rows), 1) * (tile + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(("input", "chosen mask", "edit")):
        draw.text((c * tile + 4, 2), name, fill="black")
    for r, case in enumerate(rows):
        image, mask, edited = case.images
        y = head + r * (tile + cap)
        for c, im in enumerate((image, np.asarray(overlay(Image.fromarray(image), mask)), edited)):
            tile_im = Image.fromarray(im).resize((tile, tile), Image.NEAREST)
            grid.paste(tile_im, (c * tile, y))
        mark = ("aligned" if case.aligned else "missed") + (", recoloured" if case.success else "")
        draw.text((4, y + tile + 1), f'"{case.word}" -> "{case.text}" ({mark})', fill="black")
    return grid


CASE_COLUMNS = ("models", "index", "word", "text", "colour", "aligned", "success",
                "outside_changed", "proposals", "chance_aligned", "recalled",
                "scorer_on_truth", "autoencoder_kept", "error")  # fmt: skip


def cases_csv(rows: Mapping[str, MainJob]) -> str:
    """Every edit of every row, one line each (the report's numbers are their means / sums)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    for name, job in rows.items():
        for c in job.cases:
            writer.writerow([name, c.index, c.word, c.text, c.colour, int(c.aligned),
                             int(c.success), c.outside_changed, c.proposals,
                             f"{c.chance_aligned:.4f}", int(c.recalled),
                             int(c.scorer_on_truth),
                             "" if c.autoencoder_kept is None else int(c.autoencoder_kept),
                             c.error or ""])  # fmt: skip
    return buf.getvalue()


def write_report(
    out: Path,
    rows: Mapping[str, MainJob],
    chance: Mapping[str, float],
    minutes: float,
    header: str = "",
    commands: Sequence[str] = (),
) -> dict[str, Any]:
    """report.json ({"trained": {...}, "untrained": {...}, "chance": {...}, "minutes": m}),
    report.md with the same numbers, cases.csv with every edit they come from, edits.png of
    the trained pipeline; returns the dict."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {name: job.numbers() for name, job in rows.items()}
    report["chance"] = {k: round(float(v), 4) for k, v in chance.items()}
    report["minutes"] = round(minutes, 1)
    write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text(out / "cases.csv", cases_csv(rows))
    lines = [f"# {header or 'The main job on ShapesWorld'}", "",
             "| models | alignment accuracy | colour success | pixels changed outside | n |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, job in rows.items():
        r = job.numbers()
        lines.append(f"| {name} | {r['alignment_accuracy']:.2f} | {r['colour_success']:.2f} | "
                     f"{r['outside_changed_pixels']} | {r['n']} |")  # fmt: skip
    lines.append(f"| chance | {report['chance']['alignment_accuracy']:.2f} | "
                 f"{report['chance']['colour_success']:.2f} | | |")  # fmt: skip
    lines += ["", "What bounds them (each part alone, on the same cases):", "",
              "| models | proposal recall | scorer on the true masks | autoencoder ceiling |",
              "|---|---|---|---|"]  # fmt: skip
    for name, job in rows.items():
        lim = job.limits()
        ceiling = "" if lim["autoencoder_ceiling"] is None else f"{lim['autoencoder_ceiling']:.2f}"
        lines.append(f"| {name} | {lim['proposal_recall']:.2f} | "
                     f"{lim['scorer_on_true_masks']:.2f} | {ceiling} |")  # fmt: skip
    lines += [
        "",
        "Proposal recall: a proposal has IoU >= 0.5 with the named entity (alignment "
        "cannot exceed it); scorer on the true masks: given the entities' own masks as "
        "proposals, the scorer picks the named one; autoencoder ceiling: the entity's own "
        "colour survives the editor's VAE alone (colour success cannot exceed it much).",
    ]
    lines += ["", f"{minutes:.1f} minutes in all. Alignment: the chosen mask has IoU >= 0.5 "
              "with the named entity; colour success: the requested colour dominates that "
              "entity's pixels after the edit; chance: a uniform pick among the trained "
              "segmenter's proposals and a random palette colour."]  # fmt: skip
    if commands:
        lines += ["", "Try next:", "", "```bash", *commands, "```"]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    trained = next(iter(rows.values()))
    save_image(out / "edits.png", edits_grid(trained.cases))
    return report
