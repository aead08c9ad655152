"""`python eval.py protocol=table1 method=<method> data=<dataset>`: the paper's Table I.

Config -> objects -> one call: the test split of `data`, the cases planned in a seeded order
(`table1.seed`, the first `table1.max_images`), `semani.EntityEditPipeline` of the method
(`editor`, and `alignment` with `table1.mask=aligned`), `Table1Metrics` of `metrics`, then
`semani.evaluation.table1.run_cases` and the tables (see that module for the protocol and the
files of a run folder).

**Resume**: ``table1.out_dir=<previous run>`` skips every file already there. **Predictions**
(``method=predictions``, ``table1.predictions_dir``): the edits were made elsewhere for the
cases of ``plan.csv``. **Sharding**: under ``torchrun`` (RANK, WORLD_SIZE) rank r takes cases
``r::world_size``, the metrics are synchronised once at the end and rank 0 writes the tables
(all ranks share rank 0's run folder).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from semani.alignment.types import EntityNotFoundError
from semani.evaluation.table1 import (
    PLAN_COLUMNS,
    RunFiles,
    Settings,
    grid_of,
    image_set,
    plan_cases,
    run_cases,
    shard,
    write_tables,
)
from semani.evaluation.tables import markdown_row_table
from semani.evaluation.words import load_tagger
from semani.pipeline import EntityEditPipeline
from semani.utils.atomic import write_csv
from semani.utils.errors import one_line_errors
from semani.utils.instantiators import instantiate_unwrapped
from semani.utils.pylogger import get_pylogger
from semani.utils.task_utils import exit_on_sigterm
from semani.utils.weights import check_weights

log = get_pylogger(__name__)

__all__ = ["main", "table1"]

DATASET_NAMES = {"shapes": "ShapesWorld", "cub": "CUB", "oxford": "Oxford", "coco": "COCO"}


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


def _settings(cfg: DictConfig, predictions: bool) -> Settings:
    """The run's `Settings`, after the checks that need no model: required keys, the table1
    values, the method's weight files (`weights`: a missing one is one line naming it and its
    maker)."""
    if "method_name" not in cfg:
        raise ValueError(
            "protocol=table1 needs a method: pass method=semani_diff | semani_trans | "
            "blended_ldm | predictions (configs/method/)"
        )
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ValueError(f"missing required {', '.join(missing)}: pass {missing[0]}=...")
    cfg_t = cfg.table1
    settings = Settings(
        method=str(cfg_t.method),
        mask=cfg_t.mask,
        not_found=cfg_t.not_found,
        l2=bool(cfg_t.l2),
        batch_size=int(cfg_t.batch_size),
        grid_rows=int(cfg_t.grid_rows),
        grid_tile=int(cfg_t.grid_tile),
    )
    if settings.mask == "none" and not predictions:
        raise ValueError("table1.mask=none is for predictions: use aligned or ground_truth")
    skip = ("editor.",) if predictions else ()
    skip += ("alignment.",) if settings.mask != "aligned" else ()
    check_weights(cfg, skip=skip)
    return settings


def table1(cfg: DictConfig) -> dict[str, float]:
    """Run the protocol of ``cfg.table1`` (see the module docstring); returns its metrics."""
    predictions = cfg.table1.get("predictions_dir") is not None
    settings = _settings(cfg, predictions)
    cfg_t = cfg.table1
    device = torch.device(cfg_t.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, made_group = _distributed(cfg_t, device)
    try:
        return _run(cfg, settings, predictions, device, rank, world)
    finally:
        if made_group:
            dist.destroy_process_group()


def _run(
    cfg: DictConfig,
    settings: Settings,
    predictions: bool,
    device: torch.device,
    rank: int,
    world: int,
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
    tagger = (
        load_tagger(cfg_t.get("noun_tagger", "auto")) if cfg_t.word_from == "caption" else None
    )
    cases = plan_cases(ds, order, cfg_t.word_from, cfg_t.get("word"), int(cfg_t.seed), tagger)
    rules = Counter(c.word_rule for c in cases)
    log.info("entity words: %s", ", ".join(f"{n} images by {r}" for r, n in rules.items()))
    out = [str(cfg_t.get("out_dir") or cfg.paths.output_dir)]
    if world > 1:
        dist.broadcast_object_list(out, src=0)  # every rank writes into rank 0's folder
    out = Path(out[0])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_csv(out / "plan.csv", [asdict(c) for c in cases], PLAN_COLUMNS)
    files = RunFiles(Path(str(cfg_t.predictions_dir)) if predictions else out / "images")
    if predictions:
        files.check_predictions(cases, settings.l2, out / "plan.csv")
    pool = [c for caps in ds.captions for c in caps]
    metrics = instantiate_unwrapped(cfg.metrics)(caption_pool=pool).to(device)
    pipeline = None
    if not predictions:
        with open_dict(cfg):  # one background treatment for every method (table1.composite)
            for key in ("composite", "feather"):
                if cfg_t.get(key) is not None and key in cfg.editor:
                    cfg.editor[key] = cfg_t[key]
        pipeline = EntityEditPipeline.from_config(cfg, align=settings.mask == "aligned")
    mine = shard(cases, rank, world)
    log.info("Table I: %s on %s, %d of %d images on rank %d/%d, into %s", settings.method,
             cfg.data.dataset, len(mine), len(cases), rank, world, out)  # fmt: skip
    counts, scored = run_cases(ds, mine, files, pipeline, metrics, settings, device)
    totals = torch.tensor([counts["done"] + counts["not_found"], counts["not_found"],
                           counts["skipped"]], device=device)  # fmt: skip
    per_rank = [totals.clone() for _ in range(world)]
    keys: list = [scored]
    if world > 1:
        dist.all_gather(per_rank, totals)
        keys = [None] * world
        dist.all_gather_object(keys, scored)
    if min(int(t[0]) for t in per_rank) == 0:
        raise ValueError("no image was scored on some process: every one of its images was "
                         "skipped (see the warnings), or there are too few images")  # fmt: skip
    values = metrics.compute()  # synchronised over the ranks
    n, not_found, skipped = (int(v) for v in torch.stack(per_rank).sum(0))
    dataset = DATASET_NAMES.get(cfg.data.dataset, cfg.data.dataset)
    row = {"method": settings.method, "dataset": dataset, "n": n, "not_found": not_found,
           "skipped": skipped, "image_set": image_set([k for ks in keys for k in ks]),
           "mask": "none" if predictions else settings.mask, **values}  # fmt: skip
    if world > 1:
        dist.barrier()  # every rank's images are written
    if rank == 0:
        grid = grid_of(cases, ds, files, settings.grid_rows, settings.grid_tile)
        write_tables(out, row, grid)
        log.info("Table I written to %s\n%s", out / "table1.md", markdown_row_table([row]))
    counts = {"table1/n": float(n), "table1/not_found": float(not_found)}
    return {f"table1/{k}": float(v) for k, v in values.items()} | counts


@one_line_errors(EntityNotFoundError)
def main(cfg: DictConfig) -> dict[str, Any]:
    """`table1(cfg)`; the failures a user can fix (a missing file or key, an image with no
    entity under table1.not_found=raise) exit with one line."""
    exit_on_sigterm()
    return table1(cfg)
