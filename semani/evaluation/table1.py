"""The paper's Table-I protocol on plain objects (SPEC "Evaluation protocol (Table I)").

For each test image, in a seeded order:

1. **Plan** (`plan_cases`, seeded by (seed, image index): the same case whatever the cap, order or
   sharding): the entity word (`semani.evaluation.words`: fixed "bird"/"flower", a ShapesWorld
   entity name, a COCO word of the image's captions), the target text (a random caption of a
   random *other* test image), the image's own caption (L2 error) and the editor's seed.
2. **Mask** (`find_mask`): ``aligned``: the pipeline's alignment phase (on the editor's token
   grid, the data set sample passed to the segmenter); ``ground_truth``: the data set's masks of
   the entities the word names (ShapesWorld; COCO with instance annotations).
3. **Edit** (`edit_case`) with the target text, and with the own caption (L2), through
   `semani.EntityEditPipeline` with the mask.
4. **Score** (`score_cases`) with `Table1Metrics`: IS, CLIP-score, R@1/5/10 of the target edits,
   L2 between each image and its own-caption edit, read back from the files; and the seam
   difference across the mask border of each edit (`semani.metrics.seam`, not the paper's).

`run_cases` runs steps 2-4 over a list of cases and returns the row. The files of a run folder
(`RunFiles`), each written to a temporary name then renamed (`semani.utils.atomic`) as soon as
it is made::

    images/<key>.png        the target-text edit
    images/own/<key>.png    the own-caption edit
    images/masks/<key>.png  the edited mask (0/255)
    images/meta/<key>.json  word, texts, seed, mask area and box, alignment similarities
    plan.csv, table1.md, table1.csv, table1.tex, grid.png (input | mask | output)

A case whose files are there is not remade (resume); predictions made elsewhere are a folder in
the same layout (`pipeline=None`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from semani.alignment.types import EntityNotFoundError
from semani.data.transforms import from_uint8, to_uint8
from semani.evaluation.tables import TABLE1_COLUMNS, latex_row_table, markdown_row_table
from semani.evaluation.words import COCO_WORDS, pick_word
from semani.manipulation.pixels import overlay
from semani.manipulation.region import alignment_grid
from semani.utils.atomic import save_image, write_csv, write_text
from semani.utils.errors import one_line
from semani.utils.masks import mask_to_token_mask
from semani.utils.pylogger import get_pylogger

log = get_pylogger(__name__)

__all__ = [
    "Case",
    "RunFiles",
    "Settings",
    "edit_case",
    "find_mask",
    "image_set",
    "make_grid",
    "plan_cases",
    "run_cases",
    "score_cases",
    "shard",
    "write_tables",
]

MASK_MODES = ("aligned", "ground_truth", "none")
NOT_FOUND = ("unchanged", "skip", "whole_image", "raise")
PLAN_COLUMNS = ("index", "key", "word", "target_text", "own_caption", "seed", "word_rule")
EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class Case:
    """One image of the protocol."""

    index: int  # in the test split
    key: str  # the data set's key (the image's file names)
    word: str | None  # the entity prompt word (None: the image has no candidate)
    target_text: str  # a caption of another test image
    own_caption: str  # one of the image's own captions (L2 error)
    seed: int  # the editor's seed
    word_rule: str = ""  # what gave the word: fixed, entity, spacy, vocabulary (none: no word)


@dataclass
class Settings:
    """How the cases are run (the `table1` config's keys of the same names)."""

    method: str  # the row's name
    mask: str = "aligned"  # MASK_MODES
    # NOT_FOUND: an image whose entity is not found is scored as the unchanged input (the same
    # images in every method's row), left out, edited whole, or stops the run
    not_found: str = "unchanged"
    l2: bool = True  # also edit with the own caption (L2)
    batch_size: int = 16  # images per metric update
    grid_rows: int = 8
    grid_tile: int = 128

    def __post_init__(self) -> None:
        if self.mask not in MASK_MODES or self.not_found not in NOT_FOUND:
            raise ValueError(
                f"table1.mask must be one of {MASK_MODES} and table1.not_found one of "
                f"{NOT_FOUND}, got {self.mask!r}, {self.not_found!r}"
            )


def plan_cases(
    dataset: Any,
    indices: Sequence[int],
    word_from: str,
    word: str | None,
    seed: int,
    tagger: Any = None,
) -> list[Case]:
    """The case of each image of `indices` (see the module docstring, step 1); `tagger`: the
    noun tagger of `word_from="caption"` (`semani.evaluation.words.load_tagger`)."""
    captions: list[list[str]] = dataset.captions
    n = len(captions)
    if n < 2:
        raise ValueError("the protocol needs >= 2 test images (target texts come from others)")
    cases = []
    for i in indices:
        rng = np.random.default_rng([seed, int(i)])
        other = int(rng.integers(n - 1))
        other += other >= i  # any image but i
        target = captions[other][int(rng.integers(len(captions[other])))]
        own = captions[i][int(rng.integers(len(captions[i])))]
        edit_seed = int(rng.integers(2**31 - 1))
        w, rule = pick_word(word_from, rng, word, captions[i],
                            lambda i=i: dataset[int(i)]["entity_names"], tagger)  # fmt: skip
        cases.append(Case(int(i), str(dataset.keys[i]), w, target, own, edit_seed, rule))
    return cases


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank `rank`'s part: every `world_size`-th item from `rank` (disjoint, covering)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(items[rank::world_size])


# ---------------------------------------------------------------------------------------------
# files


class RunFiles:
    """The per-image files of a run folder (or of a predictions folder)."""

    def __init__(self, images: Path) -> None:
        self.images = images

    def target(self, key: str) -> Path:
        return self.images / f"{key}.png"

    def own(self, key: str) -> Path:
        return self.images / "own" / f"{key}.png"

    def mask(self, key: str) -> Path:
        return self.images / "masks" / f"{key}.png"

    def meta(self, key: str) -> Path:
        return self.images / "meta" / f"{key}.json"

    def check_predictions(self, cases: Sequence[Case], l2: bool, plan: Path) -> None:
        """FileNotFoundError naming the first of the cases' predicted images that is missing."""
        if not self.images.is_dir():
            raise FileNotFoundError(f"table1.predictions_dir={self.images} does not exist")
        wanted = [self.target(c.key) for c in cases]
        wanted += [self.own(c.key) for c in cases] if l2 else []
        missing = [p for p in wanted if find_image(p) is None]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(wanted)} predicted images are missing, e.g. "
                f"{missing[0]} (the cases are listed in {plan}: <dir>/<key>.png is the edit for "
                "target_text, <dir>/own/<key>.png for own_caption"
                + (", or set table1.l2=false)" if l2 else ")")
            )


def find_image(path: Path) -> Path | None:
    """`path`, or the same name with another image extension; None if none exists."""
    for ext in EXTENSIONS:
        p = path.with_suffix(ext)
        if p.is_file():
            return p
    return None


def read_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 of an image file, resized (bilinear) to `size` (H, W) if needed."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im).copy()


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, Image.fromarray(array))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=1))


def as_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return to_uint8(image.cpu()).permute(1, 2, 0).numpy()


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]."""
    return from_uint8(torch.from_numpy(array).permute(2, 0, 1)[None].to(device))


# ---------------------------------------------------------------------------------------------
# one image


def _mask_info(mask: np.ndarray) -> dict[str, Any]:
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else []
    return {"area": float(mask.mean()), "pixels": int(mask.sum()), "bbox": box}


def find_mask(case: Case, sample: dict, mode: str, pipeline: Any) -> tuple:
    """(mask (H, W) bool, alignment info or None) of the case's entity; EntityNotFoundError
    also when the mask is empty or under the editor's `min_tokens` cells (the authors skip
    such entities)."""
    if case.word is None:
        raise EntityNotFoundError("", [], "the image has no candidate entity word")
    editor = pipeline.editor
    grid = alignment_grid(editor)
    if mode == "ground_truth":
        if sample.get("entity_masks") is None:
            raise ValueError("table1.mask=ground_truth needs a data set with entity masks")
        names, masks = sample["entity_names"], sample["entity_masks"] > 0.5  # (K, H, W)
        hits = [k for k, n in enumerate(names) if n in (case.word, COCO_WORDS.get(case.word))]
        if not hits:
            raise EntityNotFoundError(case.word, [], "no ground-truth entity has that name")
        mask, info = masks[hits].any(0).numpy(), None
    else:
        (step,) = pipeline.align(sample["image"], [(case.word, case.target_text)], sample)
        mask = step.mask
        res = step.alignment
        info = {"chosen": list(res.chosen), "similarities": res.similarities.tolist()}
    need = max(1, int(editor.min_tokens))
    cells = (
        int(mask_to_token_mask(torch.from_numpy(mask), grid, min_tokens=0).sum()) if grid else None
    )
    if not mask.any() or (cells is not None and cells < need):
        why = "empty" if not mask.any() else f"{cells} token cells (the editor needs {need})"
        raise EntityNotFoundError(case.word, [], f"its mask is {why}")
    return mask.astype(bool), info


def edit_case(case: Case, sample: dict, files: RunFiles, pipeline: Any, settings: Settings) -> str:
    """Make the missing files of one case (mask, edits, meta); returns "done", "not_found"
    (scored as the unchanged input) or "skipped"."""
    meta_path = files.meta(case.key)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        made = {k: meta.get(k) for k in ("word", "target_text", "own_caption")}
        if made != {k: getattr(case, k) for k in made}:
            raise ValueError(
                f"{meta_path} was made for {made}, not for this plan's case "
                f"{asdict(case)}: resume with the same settings or use a new table1.out_dir"
            )
        if meta.get("skipped"):
            return "skipped"
        return "not_found" if meta.get("not_found") else "done"
    t0 = time.perf_counter()
    image = as_uint8(sample["image"])  # (H, W, 3)
    meta: dict[str, Any] = {**asdict(case), "method": settings.method, "skipped": None}
    mask_path, info = files.mask(case.key), None
    if mask_path.is_file():
        mask = read_rgb(mask_path, image.shape[:2])[..., 0] > 127
    else:
        try:
            mask, info = find_mask(case, sample, settings.mask, pipeline)
        except EntityNotFoundError as err:
            if settings.not_found == "raise":
                raise
            log.warning("image %s: %s (table1.not_found=%s)", case.key, err, settings.not_found)
            if settings.not_found == "skip":
                meta["skipped"] = one_line(err)
                _write_json(meta_path, meta)
                return "skipped"
            if settings.not_found == "unchanged":  # the method failed: its output is the input
                for path in (files.target(case.key), files.own(case.key))[: 1 + settings.l2]:
                    _save_png(image, path)
                meta.update(not_found=one_line(err), mask=None, alignment=None)
                _write_json(meta_path, meta)
                return "not_found"
            mask = np.ones(image.shape[:2], bool)
        _save_png(mask.astype(np.uint8) * 255, mask_path)
    jobs = [(files.target(case.key), case.target_text)]
    if settings.l2:
        jobs.append((files.own(case.key), case.own_caption))
    for path, text in jobs:
        if not path.is_file():
            result = pipeline(Image.fromarray(image), text, mask=mask, seed=case.seed)
            _save_png(np.asarray(result.image), path)
    meta.update(mask=_mask_info(mask), alignment=info, seconds=time.perf_counter() - t0)
    _write_json(meta_path, meta)
    log.info("%s: %r -> %r (mask %.1f%%, %.1f s)", case.key, case.word, case.target_text,
             100 * meta["mask"]["area"], meta["seconds"])  # fmt: skip
    return "done"


def score_cases(
    metrics: Any, batch: list, files: RunFiles, l2: bool, device: torch.device
) -> None:
    """Update the metrics with the edits of `batch` ((case, input (H, W, 3) uint8) pairs), read
    back from their files (so a resumed run scores the same bytes as a fresh one)."""
    index = torch.tensor([c.index for c, _ in batch], device=device)
    size = batch[0][1].shape[:2]
    edited = [read_rgb(find_image(files.target(c.key)), size) for c, _ in batch]
    outputs = torch.cat([_to_tensor(e, device) for e in edited])  # (B, 3, H, W)
    metrics.update(outputs, [c.target_text for c, _ in batch], index)
    inputs = torch.cat([_to_tensor(x, device) for _, x in batch])
    if l2:
        own = torch.cat([_to_tensor(read_rgb(find_image(files.own(c.key)), size), device)
                         for c, _ in batch])  # fmt: skip
        metrics.update_l2(inputs, own, index)
    # the seam of the edits that have a mask (an entity not found was left unchanged); every
    # batch updates it, empty or not, so that every process has updated it under DDP
    if hasattr(metrics, "update_seam"):
        masked = [k for k, (c, _) in enumerate(batch) if files.mask(c.key).is_file()]
        masks = torch.zeros((len(masked), *size), dtype=torch.bool, device=device)
        for j, k in enumerate(masked):
            masks[j] = torch.from_numpy(read_rgb(files.mask(batch[k][0].key), size)[..., 0] > 127)
        pick = torch.tensor(masked, dtype=torch.long, device=device)
        metrics.update_seam(inputs[pick], outputs[pick], masks, index[pick])


def run_cases(
    dataset: Any,
    cases: Sequence[Case],
    files: RunFiles,
    pipeline: Any,
    metrics: Any,
    settings: Settings,
    device: torch.device,
) -> tuple[dict[str, int], list[str]]:
    """Steps 2-4 for `cases` (`pipeline=None`: predictions, only scored); returns the counts
    {"done": n, "not_found": n, "skipped": n} and the keys scored. The metrics are updated,
    not computed."""
    counts = {"done": 0, "not_found": 0, "skipped": 0}
    scored: list[str] = []
    batch: list[tuple[Case, np.ndarray]] = []
    with torch.no_grad():
        for k, case in enumerate(cases):
            sample = dataset[case.index]
            status = (
                "done" if pipeline is None else edit_case(case, sample, files, pipeline, settings)
            )
            counts[status] += 1
            if status != "skipped":
                batch.append((case, as_uint8(sample["image"])))
                scored.append(case.key)
            if len(batch) == settings.batch_size or (k == len(cases) - 1 and batch):
                score_cases(metrics, batch, files, settings.l2, device)
                batch = []
    return counts, scored


def image_set(keys: Sequence[str]) -> str:
    """A short hash of the scored image keys: rows with the same one compare."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# outputs


def make_grid(rows: Sequence[tuple], tile: int = 128) -> Image.Image:
    """Fig.-7-like grid: one row per (input, mask or None, output, caption), columns input |
    mask (the input with the mask tinted) | output, the caption under each row. PIL only."""
    head, cap, cols = 14, 14, ("input", "mask", "output")
    grid = Image.new("RGB", (3 * tile, head + len(rows) * (tile + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(cols):
        draw.text((c * tile + 4, 2), name, fill="black")
    for r, (image, mask, output, caption) in enumerate(rows):
        y = head + r * (tile + cap)
        tint = overlay(Image.fromarray(image), mask) if mask is not None else None
        for c, im in enumerate((Image.fromarray(image), tint, Image.fromarray(output))):
            if im is None:
                im = Image.new("RGB", (tile, tile), (200, 200, 200))
            grid.paste(im.resize((tile, tile), Image.BILINEAR), (c * tile, y))
        draw.text((4, y + tile + 1), caption[: 3 * tile // 6], fill="black")
    return grid


def grid_of(cases: Sequence[Case], dataset: Any, files: RunFiles, n: int, tile: int):
    """`make_grid` of the first `n` cases that have an edit (None if none has)."""
    rows = []
    for case in cases:
        if len(rows) >= n:
            break
        path = find_image(files.target(case.key))
        if path is None:  # skipped
            continue
        image = as_uint8(dataset[case.index]["image"])
        mask_path = files.mask(case.key)
        mask = read_rgb(mask_path, image.shape[:2])[..., 0] > 127 if mask_path.is_file() else None
        output = read_rgb(path, image.shape[:2])
        rows.append((image, mask, output, f"{case.word}: {case.target_text}"))
    return make_grid(rows, tile) if rows else None


def write_tables(out: Path, row: dict, grid: Image.Image | None) -> None:
    """table1.md, table1.csv, table1.tex (and grid.png) of one run's row."""
    title = f"# Table I: {row['method']} on {row['dataset']}\n\n"
    write_text(out / "table1.md", title + markdown_row_table([row]))
    write_csv(out / "table1.csv", [row], TABLE1_COLUMNS)
    write_text(out / "table1.tex", latex_row_table([row]))
    if grid is not None:
        save_image(out / "grid.png", grid)
