"""`python eval.py experiment=eval_<method>_<dataset>`: the paper's Table-I protocol.

For each test image, in a seeded order (`table1.seed`), the first `table1.max_images`:

1. **Plan** (`plan_cases`, seeded by (seed, image index): the same case whatever the cap, order or
   sharding): the entity word (`table1.word_from`: fixed "bird"/"flower", a ShapesWorld entity
   name, a COCO word of the image's captions; `semani.tasks.table1_words`), the target text (a
   random caption of a random *other* test image, SPEC), the image's own caption (L2 error) and
   the editor's seed. Every case is listed in ``plan.csv`` (the inputs of methods run elsewhere).
2. **Mask**: ``table1.mask=aligned``: the alignment phase of ``alignment`` (built as
   `manipulate.py` does; SeMani-Trans: the token-wise scorer on its token grid, the diffusion
   editors: the mask-prompt scorer); ``ground_truth``: the data set's masks of the entities the
   word names (ShapesWorld; COCO with ``data.instances_json``).
3. **Edit** (``editor``) with the target text, and with the own caption (``table1.l2``).
4. **Score** with `Table1Metrics` (``metrics``): IS, CLIP-score, R@1/5/10 of the target edits,
   L2 between each image and its own-caption edit.

The run folder (``table1.out_dir``, default this run's output folder) holds, each file written
to a temporary name then renamed (`semani.utils.atomic`) as soon as it is made::

    images/<key>.png        the target-text edit (<key>: the data set's key, e.g.
                            001.Black_footed_Albatross/Black_Footed_Albatross_0046_18)
    images/own/<key>.png    the own-caption edit
    images/masks/<key>.png  the edited mask (0/255)
    images/meta/<key>.json  word, texts, seed, mask area and box, alignment similarities
    plan.csv, table1.md, table1.csv, table1.tex, grid.png (input | mask | output)

**Resume**: ``table1.out_dir=<previous run>`` skips every file already there and reads the images
back for the metrics (a meta file whose texts differ from this plan is an error). **Predictions**
(``table1.predictions_dir``, no editor): the edits were made elsewhere (ManiGAN,
Lightweight-GAN) for the cases of ``plan.csv`` and saved in that layout, ``<dir>/<key>.png``
and ``<dir>/own/<key>.png`` (.png/.jpg; resized to the data set's size); a run's ``images/``
folder is such a folder. **Sharding**: under ``torchrun`` (RANK, WORLD_SIZE) rank r takes
cases ``r::world_size``, the metrics are synchronised once at the end and rank 0 writes the
tables (all ranks share rank 0's run folder).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from semani.alignment.segmenters import GroundTruthSegmenter
from semani.alignment.types import EntityNotFoundError
from semani.data.transforms import from_uint8, to_uint8
from semani.tasks.manipulate import (
    USER_ERRORS,
    build_aligner,
    build_editor,
    instantiate_unwrapped,
    one_line,
    overlay,
)
from semani.tasks.table1_words import COCO_WORDS, pick_word
from semani.utils.atomic import save_image, write_csv, write_text
from semani.utils.masks import mask_to_token_mask
from semani.utils.pylogger import get_pylogger
from semani.utils.tables import TABLE1_COLUMNS, latex_row_table, markdown_row_table

log = get_pylogger(__name__)

__all__ = ["Case", "main", "plan_cases", "shard", "table1"]

DATASET_NAMES = {"shapes": "ShapesWorld", "cub": "CUB", "oxford": "Oxford", "coco": "COCO"}
MASK_MODES = ("aligned", "ground_truth", "none")
NOT_FOUND = ("skip", "whole_image", "raise")
PLAN_COLUMNS = ("index", "key", "word", "target_text", "own_caption", "seed")
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


def plan_cases(
    dataset: Any, indices: Sequence[int], word_from: str, word: str | None, seed: int
) -> list[Case]:
    """The case of each image of `indices` (see the module docstring, step 1)."""
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
        w = pick_word(word_from, rng, word, captions[i],
                      lambda i=i: dataset[int(i)]["entity_names"])  # fmt: skip
        cases.append(Case(int(i), str(dataset.keys[i]), w, target, own, edit_seed))
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


def _find(path: Path) -> Path | None:
    """`path`, or the same name with another image extension; None if none exists."""
    for ext in EXTENSIONS:
        p = path.with_suffix(ext)
        if p.is_file():
            return p
    return None


def _read_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
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


def _to_uint8(image: torch.Tensor) -> np.ndarray:
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


def _find_mask(case: Case, sample: dict, mode: str, aligner: Any, editor: Any) -> tuple:
    """(mask (H, W) bool, alignment info or None) of the case's entity; EntityNotFoundError
    also when the mask is empty or under the editor's `min_tokens` cells (the authors skip
    such entities)."""
    if case.word is None:
        raise EntityNotFoundError("", [], "the image has no candidate entity word")
    grid = getattr(editor, "token_grid", None)
    if mode == "ground_truth":
        if sample.get("entity_masks") is None:
            raise ValueError("table1.mask=ground_truth needs a data set with entity masks")
        names, masks = sample["entity_names"], sample["entity_masks"] > 0.5  # (K, H, W)
        hits = [k for k, n in enumerate(names) if n in (case.word, COCO_WORDS.get(case.word))]
        if not hits:
            raise EntityNotFoundError(case.word, [], "no ground-truth entity has that name")
        mask, info = masks[hits].any(0), None
    else:
        proposals = None
        if isinstance(aligner.segmenter, GroundTruthSegmenter):
            proposals = aligner.segmenter.segment(sample["image"], sample=sample)
        res = aligner.align(sample["image"], case.word, token_grid=grid, proposals=proposals)
        mask = res.mask.cpu()
        info = {"chosen": list(res.chosen), "similarities": res.similarities.tolist()}
    need = max(1, int(getattr(editor, "min_tokens", 1)))
    cells = int(mask_to_token_mask(mask, grid, min_tokens=0).sum()) if grid else None
    if not mask.any() or (cells is not None and cells < need):
        why = "empty" if not mask.any() else f"{cells} token cells (the editor needs {need})"
        raise EntityNotFoundError(case.word, [], f"its mask is {why}")
    return mask.numpy().astype(bool), info


def _process(case: Case, sample: dict, files: RunFiles, cfg_t: DictConfig, parts: dict) -> str:
    """Make the missing files of one case; returns "done" or "skipped"."""
    meta_path = files.meta(case.key)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        made = {k: meta.get(k) for k in ("word", "target_text", "own_caption")}
        if made != {k: getattr(case, k) for k in made}:
            raise ValueError(
                f"{meta_path} was made for {made}, not for this plan's case "
                f"{asdict(case)}: resume with the same settings or use a new table1.out_dir"
            )
        return "skipped" if meta.get("skipped") else "done"
    t0 = time.perf_counter()
    image = _to_uint8(sample["image"])  # (H, W, 3)
    meta: dict[str, Any] = {**asdict(case), "method": cfg_t.method, "skipped": None}
    mask_path, info = files.mask(case.key), None
    if mask_path.is_file():
        mask = _read_rgb(mask_path, image.shape[:2])[..., 0] > 127
    else:
        try:
            mask, info = _find_mask(case, sample, cfg_t.mask, parts["aligner"], parts["editor"])
        except EntityNotFoundError as err:
            if cfg_t.not_found == "raise":
                raise
            log.warning("image %s: %s (table1.not_found=%s)", case.key, err, cfg_t.not_found)
            if cfg_t.not_found == "skip":
                meta["skipped"] = one_line(err)
                _write_json(meta_path, meta)
                return "skipped"
            mask = np.ones(image.shape[:2], bool)
        _save_png(mask.astype(np.uint8) * 255, mask_path)
    jobs = [(files.target(case.key), case.target_text)]
    if cfg_t.l2:
        jobs.append((files.own(case.key), case.own_caption))
    for path, text in jobs:
        if not path.is_file():
            out = parts["editor"].edit(Image.fromarray(image), mask, text, seed=case.seed)[0]
            _save_png(np.asarray(out.convert("RGB") if hasattr(out, "convert") else out), path)
    meta.update(mask=_mask_info(mask), alignment=info, seconds=time.perf_counter() - t0)
    _write_json(meta_path, meta)
    log.info("%s: %r -> %r (mask %.1f%%, %.1f s)", case.key, case.word, case.target_text,
             100 * meta["mask"]["area"], meta["seconds"])  # fmt: skip
    return "done"


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


def _write_outputs(out: Path, row: dict, grid: Image.Image | None) -> None:
    title = f"# Table I: {row['method']} on {row['dataset']}\n\n"
    write_text(out / "table1.md", title + markdown_row_table([row]))
    write_csv(out / "table1.csv", [row], TABLE1_COLUMNS)
    write_text(out / "table1.tex", latex_row_table([row]))
    if grid is not None:
        save_image(out / "grid.png", grid)


# ---------------------------------------------------------------------------------------------
# the task


def _distributed(cfg_t: DictConfig, device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call made the process group) from torchrun's env."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = cfg_t.get("backend") or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def _check_inputs(cfg: DictConfig, predictions: bool) -> None:
    """Required keys and the weights of ``table1.weights`` (key: what makes it), before
    anything is built: a missing file is one line naming it and its maker."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ValueError(f"missing required {', '.join(missing)}: pass {missing[0]}=...")
    cfg_t = cfg.table1
    if cfg_t.mask not in MASK_MODES or cfg_t.not_found not in NOT_FOUND:
        raise ValueError(f"table1.mask must be one of {MASK_MODES} and table1.not_found one of "
                         f"{NOT_FOUND}, got {cfg_t.mask!r}, {cfg_t.not_found!r}")  # fmt: skip
    if cfg_t.mask == "none" and not predictions:
        raise ValueError("table1.mask=none is for predictions: use aligned or ground_truth")
    for key, maker in (cfg_t.get("weights") or {}).items():
        if (predictions and key.startswith("editor.")) or (
            cfg_t.mask != "aligned" and key.startswith("alignment.")
        ):
            continue
        path = OmegaConf.select(cfg, key)
        local = path is not None and (os.path.isabs(path) or str(path).startswith((".", "~")))
        if local and not Path(str(path)).expanduser().exists():  # not a hub name or tag
            raise FileNotFoundError(f"{key}={path} does not exist; it is made by: {maker}")


def table1(cfg: DictConfig) -> dict[str, float]:
    """Run the protocol of ``cfg.table1`` (see the module docstring); returns its metrics."""
    cfg_t = cfg.table1
    predictions = cfg_t.get("predictions_dir") is not None
    _check_inputs(cfg, predictions)
    device = torch.device(cfg_t.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, made_group = _distributed(cfg_t, device)
    try:
        return _run(cfg, predictions, device, rank, world)
    finally:
        if made_group:
            dist.destroy_process_group()


def _run(
    cfg: DictConfig, predictions: bool, device: torch.device, rank: int, world: int
) -> dict[str, float]:
    cfg_t = cfg.table1
    if cfg.get("seed") is not None:
        torch.manual_seed(int(cfg.seed))  # untrained parts (tests)
    datamodule = instantiate_unwrapped(cfg.data)
    datamodule.setup("test")
    ds = datamodule.data_test
    if not hasattr(ds, "captions"):
        raise ValueError("the protocol needs a map-style caption data set (no entity_crops)")
    order = np.random.default_rng(int(cfg_t.seed)).permutation(len(ds)).tolist()
    order = order[: cfg_t.max_images] if cfg_t.get("max_images") else order
    if world > len(order):
        raise ValueError(f"{world} processes for {len(order)} images: use fewer processes")
    cases = plan_cases(ds, order, cfg_t.word_from, cfg_t.get("word"), int(cfg_t.seed))
    out = [str(cfg_t.get("out_dir") or cfg.paths.output_dir)]
    if world > 1:
        dist.broadcast_object_list(out, src=0)  # every rank writes into rank 0's folder
    out = Path(out[0])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_csv(out / "plan.csv", [asdict(c) for c in cases], PLAN_COLUMNS)
    files = RunFiles(Path(str(cfg_t.predictions_dir)) if predictions else out / "images")
    if predictions:
        _check_predictions(files, cases, bool(cfg_t.l2), out / "plan.csv")
    pool = [c for caps in ds.captions for c in caps]
    metrics = instantiate_unwrapped(cfg.metrics)(caption_pool=pool).to(device)
    parts: dict[str, Any] = {"editor": None, "aligner": None}
    if not predictions:
        parts["editor"] = build_editor(cfg.editor)
        if cfg_t.mask == "aligned":
            parts["aligner"] = build_aligner(cfg.alignment)
    mine = shard(cases, rank, world)
    log.info("Table I: %s on %s, %d of %d images on rank %d/%d, into %s", cfg_t.method,
             cfg.data.dataset, len(mine), len(cases), rank, world, out)  # fmt: skip
    counts = {"done": 0, "skipped": 0}
    batch: list[tuple[Case, np.ndarray]] = []
    with torch.no_grad():
        for k, case in enumerate(mine):
            sample = ds[case.index]
            if predictions:
                status = "done"
            else:
                status = _process(case, sample, files, cfg_t, parts)
            counts[status] += 1
            if status == "done":
                batch.append((case, _to_uint8(sample["image"])))
            if len(batch) == int(cfg_t.batch_size) or (k == len(mine) - 1 and batch):
                _score(metrics, batch, files, bool(cfg_t.l2), device)
                batch = []
    totals = torch.tensor([counts["done"], counts["skipped"]], device=device)
    per_rank = [totals.clone() for _ in range(world)]
    if world > 1:
        dist.all_gather(per_rank, totals)
    if min(int(t[0]) for t in per_rank) == 0:
        raise ValueError("no image was scored on some process: every one of its images was "
                         "skipped (see the warnings), or there are too few images")  # fmt: skip
    values = metrics.compute()  # synchronised over the ranks
    n, skipped = (int(v) for v in torch.stack(per_rank).sum(0))
    dataset = DATASET_NAMES.get(cfg.data.dataset, cfg.data.dataset)
    row = {"method": cfg_t.method, "dataset": dataset, "n": n, "skipped": skipped,
           "mask": "none" if predictions else cfg_t.mask, **values}  # fmt: skip
    if world > 1:
        dist.barrier()  # every rank's images are written
    if rank == 0:
        grid = _grid(cases, ds, files, int(cfg_t.grid_rows), int(cfg_t.grid_tile))
        _write_outputs(out, row, grid)
        log.info("Table I written to %s\n%s", out / "table1.md", markdown_row_table([row]))
    return {f"table1/{k}": float(v) for k, v in values.items()} | {"table1/n": float(n)}


def _check_predictions(files: RunFiles, cases: Sequence[Case], l2: bool, plan: Path) -> None:
    if not files.images.is_dir():
        raise FileNotFoundError(f"table1.predictions_dir={files.images} does not exist")
    wanted = [files.target(c.key) for c in cases]
    wanted += [files.own(c.key) for c in cases] if l2 else []
    missing = [p for p in wanted if _find(p) is None]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(wanted)} predicted images are missing, e.g. {missing[0]} "
            f"(the cases are listed in {plan}: <dir>/<key>.png is the edit for target_text, "
            "<dir>/own/<key>.png for own_caption" + (", or set table1.l2=false)" if l2 else ")")
        )


def _score(metrics: Any, batch: list, files: RunFiles, l2: bool, device: torch.device) -> None:
    """Update the metrics with the edits of `batch` ((case, input (H, W, 3) uint8) pairs), read
    back from their files (so a resumed run scores the same bytes as a fresh one)."""
    index = torch.tensor([c.index for c, _ in batch], device=device)
    size = batch[0][1].shape[:2]
    edited = [_read_rgb(_find(files.target(c.key)), size) for c, _ in batch]
    metrics.update(torch.cat([_to_tensor(e, device) for e in edited]),
                   [c.target_text for c, _ in batch], index)  # fmt: skip
    if l2:
        own = torch.cat([_to_tensor(_read_rgb(_find(files.own(c.key)), size), device)
                         for c, _ in batch])  # fmt: skip
        metrics.update_l2(torch.cat([_to_tensor(x, device) for _, x in batch]), own, index)


def _grid(cases: Sequence[Case], ds: Any, files: RunFiles, n: int, tile: int):
    rows = []
    for case in cases:
        if len(rows) >= n:
            break
        path = _find(files.target(case.key))
        if path is None:  # skipped
            continue
        image = _to_uint8(ds[case.index]["image"])
        mask_path = files.mask(case.key)
        mask = _read_rgb(mask_path, image.shape[:2])[..., 0] > 127 if mask_path.is_file() else None
        output = _read_rgb(path, image.shape[:2])
        rows.append((image, mask, output, f"{case.word}: {case.target_text}"))
    return make_grid(rows, tile) if rows else None


def main(cfg: DictConfig) -> dict[str, float]:
    """`table1(cfg)`; the failures a user can fix (a missing file or key, an image with no
    entity under table1.not_found=raise) exit with one line."""
    try:
        return table1(cfg)
    except EntityNotFoundError as err:
        raise SystemExit(f"error: {one_line(err)}") from None
    except USER_ERRORS as err:
        log.debug("table1 failed", exc_info=True)
        raise SystemExit(f"error: {one_line(err)}") from None
