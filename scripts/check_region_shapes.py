"""Does SeMani-Diff recolour an entity of a large image better on a window around it
(``editor.region=entity``) than on the whole image resized to the model (``region=image``)?

    python scripts/check_region_shapes.py --model pretrained/quickstart/semani_diff_shapes \\
      --data data/shapes --n 100

Prints one JSON line. ShapesWorld's generator does not render the same scenes at another size
(``--seed 0 --size 512`` keeps the shapes of only 38 of the first 50 test scenes: the noisy
backgrounds draw a size-dependent number of random values), so the 64 px test images and their
masks are upscaled (nearest, ``--scale``: 8 gives 512 px). For each of the first ``--n`` test
images the first entity is recoloured with its true mask under "a <new colour> <shape>", the
colour and the seed drawn as `scripts/check_diff_shapes.py` draws them, by a SeMani-Diff
`DiffEditor` loaded from ``--model`` (a diffusers folder) at the model's own size
(``side="native"``, as ``method=semani_diff_shapes``), with the pixel composite (``--feather``
px seam), once with ``region=image`` and once with ``region=entity`` (``--context``). An edit
succeeds when the requested colour dominates the entity's own pixels (check_diff_shapes's
`dominant`, nearest palette colour). Reported, per region:

- ``colour_success`` and ``success_by_size`` (the entity's "small" / "medium" / "large");
  ``discordant``: the edits that succeed with one region only (``image_only``,
  ``entity_only``), what a paired test of the two would read;
- ``outside_changed``: pixels outside the mask that differ from the input (must be 0);
- ``seconds_per_edit``: mean wall time of one edit of the upscaled images;
- ``photo``: one test image (the first whose first entity is small) upscaled (nearest) to
  ``--photo H W`` (3000 x 4000 by default), edited twice per region (entity first): the seconds
  of the first edit (``seconds_per_edit``), and during the second the process's peak resident
  memory (``peak_rss_mb``, sampled every 2 ms from /proc/self/statm after glibc's
  ``malloc_trim``) and its rise over the memory at the edit's start (``rss_rise_mb``; the photo
  itself and the model are resident then).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from check_diff_shapes import NAMES, dominant

from semani.data.shapes import ShapesWorldDataset
from semani.data.shapes_generator import with_article
from semani.data.transforms import to_uint8
from semani.manipulation.diff_editor import DiffEditor, pretrained_parts

log = logging.getLogger("check_region_shapes")

REGIONS = ("image", "entity")


def upscale(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, ...) -> (H, W, ...) by nearest neighbour (every pixel a block of its own)."""
    h, w = array.shape[:2]
    rows = np.arange(size[0]) * h // size[0]
    cols = np.arange(size[1]) * w // size[1]
    return array[rows[:, None], cols[None, :]]


def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so that a peak is the call's own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def seconds_of(fn: Callable[[], Any]) -> float:
    """The wall time of one call of `fn`."""
    trim_heap()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run `fn` -> (its result, resident memory in MiB at its start, the peak while it ran)."""
    trim_heap()
    start = rss_mb()
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, start, max(peak[0], rss_mb())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a SeMani-Diff diffusers folder")
    p.add_argument("--data", required=True, help="the ShapesWorld root")
    p.add_argument("--n", type=int, default=100, help="test images to edit")
    p.add_argument("--scale", type=int, default=8, help="nearest upscaling of the 64 px images")
    p.add_argument("--context", type=float, default=0.5, help="region=entity's margin")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--feather", type=int, default=0, help="seam width (0: hard mask)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photo", type=int, nargs=2, default=[3000, 4000], metavar=("H", "W"),
                   help="the large photo's size")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    rss_before = rss_mb()
    parts = pretrained_parts(args.model, True, "DDIMScheduler", None, None)
    kw = {"steps": args.steps, "guidance_scale": args.guidance, "feather": args.feather,
          "side": "native", "composite": True, "context": args.context}  # fmt: skip
    editors = {r: DiffEditor(**parts, region=r, **kw) for r in REGIONS}
    ds = ShapesWorldDataset(args.data, split="test", image_size=64, context_length=77)
    rng = np.random.default_rng(args.seed)  # the colours of check_diff_shapes
    n = min(args.n, len(ds))
    hits: dict[str, dict[str, list[bool]]] = {r: {} for r in REGIONS}
    discordant = {f"{r}_only": 0 for r in REGIONS}
    outside = dict.fromkeys(REGIONS, 0)
    seconds: dict[str, list[float]] = {r: [] for r in REGIONS}
    photo = None  # (image, mask, text, seed, size) of the large photo
    for i in range(n):
        sample = ds[i]
        meta = json.loads((ds.root / "entities" / f"{ds.keys[i]}.json").read_text())
        entity = meta["entities"][0]
        mask = (sample["entity_masks"][0] > 0.5).numpy()  # (64, 64)
        if not mask.any():
            continue
        new = str(rng.choice([c for c in NAMES if c != entity["color"]]))
        text = with_article(f"{new} {entity['name']}")
        image = to_uint8(sample["image"]).permute(1, 2, 0).numpy()  # (64, 64, 3)
        if photo is None or (entity["size"] == "small" and photo[-1] != "small"):
            photo = (image, mask, text, args.seed + i, entity["size"])
        size = (mask.shape[0] * args.scale, mask.shape[1] * args.scale)
        big, big_mask = upscale(image, size), upscale(mask, size)
        for region, editor in editors.items():
            t0 = time.perf_counter()
            out = editor.edit(big, big_mask, text, seed=args.seed + i)[0]  # (H, W, 3)
            seconds[region].append(time.perf_counter() - t0)
            outside[region] += int((out[~big_mask] != big[~big_mask]).any(-1).sum())
            hits[region].setdefault(entity["size"], []).append(dominant(out[big_mask]) == new)
        ok = {r: hits[r][entity["size"]][-1] for r in REGIONS}
        if ok["image"] != ok["entity"]:
            discordant["image_only" if ok["image"] else "entity_only"] += 1
        log.info("%d/%d %s %s", i + 1, n, entity["size"], text)

    large: dict[str, Any] = {"size": list(args.photo)}
    if photo is not None:
        image, mask, text, seed, entity_size = photo
        big, big_mask = upscale(image, tuple(args.photo)), upscale(mask, tuple(args.photo))
        large["entity_size"] = entity_size
        for region in reversed(REGIONS):  # entity first: a smaller heap left for image
            edit = lambda e=editors[region]: e.edit(big, big_mask, text, seed=seed)
            secs = seconds_of(edit)
            out, start, peak = peak_memory(edit)
            changed = int((out[0][~big_mask] != big[~big_mask]).any(-1).sum())
            large[region] = {"seconds_per_edit": secs, "peak_rss_mb": peak,
                             "rss_rise_mb": peak - start, "outside_changed": changed}  # fmt: skip
            del out
        large["rss_before_model_mb"] = rss_before
    done = sum(len(v) for v in hits["image"].values())
    result = {
        "model": args.model,
        "n": done,
        "image_size": 64 * args.scale,
        "steps": args.steps,
        "guidance": args.guidance,
        "context": args.context,
        "feather": args.feather,
        "threads": torch.get_num_threads(),
        "chance": 1 / len(NAMES),
        "colour_success": {
            r: float(np.mean([x for v in hits[r].values() for x in v])) if done else 0.0
            for r in REGIONS
        },
        "success_by_size": {
            r: {k: float(np.mean(v)) for k, v in sorted(hits[r].items())} for r in REGIONS
        },
        "entities_by_size": {k: len(v) for k, v in sorted(hits["image"].items())},
        "discordant": discordant,
        "outside_changed": outside,
        "seconds_per_edit": {r: float(np.mean(s)) if s else 0.0 for r, s in seconds.items()},
        "photo": large,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
