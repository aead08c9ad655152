"""Benchmark: starting OVSeg's segmenter with its vocabulary's embeddings from the user's cache
against computing them (the CLIP's text tower over every class name and template).

    python scripts/bench/ovseg_start.py --threads 1        # random weights at OVSeg's size
    python scripts/bench/ovseg_start.py --ckpt pretrained/ovseg/ovseg_swinbase_vitL14_ft_mpt.pth

Without `--ckpt` a checkpoint with OVSeg's released layout and size (Swin-B MaskFormer and the
ViT-L/14 CLIP, seeded random values: `semani.evaluation.smoke_weights.build_ovseg`) is written
to a temporary folder first (1.6 GB; not timed). Then, in this process: `OVSegSegmenter(ckpt,
cache_vocabulary=False)` (the reference: computes the embeddings), the same with an empty cache
(computes and writes them) and again (reads them), each `--repeats` times with a fresh cache
folder for the cold start; the median wall time of each. Prints one JSON line with the ratios
against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(build) -> float:
    t0 = time.perf_counter()
    build()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="OVSeg's file (default: random)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from semani.alignment.segmenters.ovseg import OVSegSegmenter

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt
        if ckpt is None:
            from semani.evaluation.smoke_weights import build_ovseg

            build_ovseg(Path(tmp), seed=0)
            ckpt = Path(tmp) / "ovseg" / "ovseg_swinbase_vitL14_ft_mpt.pth"
        runs: dict[str, list[float]] = {"uncached": [], "cold": [], "warm": []}
        for r in range(args.repeats):
            os.environ["SEMANI_CACHE_DIR"] = str(Path(tmp) / f"cache{r}")
            runs["uncached"].append(timed(lambda: OVSegSegmenter(ckpt, cache_vocabulary=False)))
            runs["cold"].append(timed(lambda: OVSegSegmenter(ckpt)))
            runs["warm"].append(timed(lambda: OVSegSegmenter(ckpt)))
    median = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "bench": "ovseg_start",
        "checkpoint": "random, OVSeg's size" if args.ckpt is None else str(args.ckpt),
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 2) for k, v in median.items()},
        "cold_ratio": round(median["cold"] / median["uncached"], 3),
        "warm_ratio": round(median["warm"] / median["uncached"], 3),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
