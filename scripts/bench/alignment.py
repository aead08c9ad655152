"""Benchmark: scoring K entities in one batched forward vs one forward per entity.

    python scripts/bench/alignment.py                      # CPU, ViT-S-32 random init, 1 thread
    python scripts/bench/alignment.py --device cuda --model ViT-L-14 --repeats 10 --threads 0

For K = 1, 4, 16, 64 entity masks of one 256 px image and the word "bird":

- `mask_prompt`: `MaskPromptScorer` (OVSeg's mask-prompted CLIP, depth 3, random prompt): the
  K masked crops through the ViT in one forward, against K scorer calls of one proposal each;
- `token_wise`: `TokenWiseScorer`: one image forward for all K masks, against K calls.

Weights are random (timing only); text features are cached before timing (both ways). Each
measurement is the median of `--repeats`; the ratio (batched / loop) uses process CPU time on
the CPU (steadier on a shared machine; use --threads 1) and wall time on CUDA. Prints one JSON
line. The goal: K = 64 in at most 0.2x the loop's time.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from semani.alignment import EntityProposals, MaskPromptScorer, TokenWiseScorer
from semani.modules.clip import ClipModel
from semani.modules.mask_clip import MaskPromptCLIP

log = logging.getLogger("bench.alignment")


def random_masks(k: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(k, size, size) bool rectangles of 1/4 .. 3/4 of the side (enough cells for any grid)."""
    masks = torch.zeros(k, size, size, dtype=torch.bool)
    for i in range(k):
        h, w = torch.randint(size // 4, 3 * size // 4, (2,), generator=gen).tolist()
        top = int(torch.randint(0, size - h, (1,), generator=gen))
        left = int(torch.randint(0, size - w, (1,), generator=gen))
        masks[i, top : top + h, left : left + w] = True
    return masks


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def compare(scorer, image, masks, word, device, repeats, amp) -> dict:
    if amp != "none":  # the same autocast for both ways
        plain, dtype = scorer, {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

        def scorer(*a):
            with torch.autocast(device.type, dtype=dtype):
                return plain(*a)

    props = EntityProposals(masks, torch.ones(masks.shape[0]))
    singles = [EntityProposals(masks[i : i + 1], torch.ones(1)) for i in range(masks.shape[0])]
    batched = scorer(image, props, word)
    looped = torch.cat([scorer(image, p, word) for p in singles])
    max_diff = float((batched - looped).abs().max())
    bw, bc = timed(lambda: scorer(image, props, word), device, repeats)
    lw, lc = timed(lambda: [scorer(image, p, word) for p in singles], device, repeats)
    use_cpu = device.type == "cpu"
    ratio = (bc / lc) if use_cpu else (bw / lw)
    return {
        "batched_wall_s": round(bw, 4),
        "loop_wall_s": round(lw, 4),
        "batched_cpu_s": round(bc, 4),
        "loop_cpu_s": round(lc, 4),
        "ratio": round(ratio, 3),
        "max_abs_diff": max_diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-S-32", help="open_clip ViT architecture (random init)")
    p.add_argument("--ks", default="1,4,16,64")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--skip-token-wise", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)
    clip = ClipModel(args.model).to(device)
    mask_clip = MaskPromptCLIP(clip=clip, depth=3).to(device)
    with torch.no_grad():
        mask_clip.mask_embedding.normal_(std=0.02)
    scorers = {"mask_prompt": MaskPromptScorer(model=mask_clip)}
    if not args.skip_token_wise:
        scorers["token_wise"] = TokenWiseScorer(clip=clip)
    gen = torch.Generator().manual_seed(0)
    image = (torch.rand(3, args.image_size, args.image_size, generator=gen) * 2 - 1).to(device)
    ks = [int(k) for k in args.ks.split(",")]
    all_masks = random_masks(max(ks), args.image_size, gen).to(device)
    out: dict = {
        "bench": "alignment",
        "model": args.model,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "amp": args.amp,
        "tf32": args.tf32,
        "ratio_is": "cpu time" if device.type == "cpu" else "wall time",
    }
    start = time.perf_counter()
    for name, scorer in scorers.items():
        out[name] = {
            str(k): compare(scorer, image, all_masks[:k], "bird", device, args.repeats, args.amp)
            for k in ks
        }
    k_max = str(max(ks))
    out["goal"] = "K=64 batched <= 0.2x loop"
    out["ratio_at_max_k"] = {name: out[name][k_max]["ratio"] for name in scorers}
    out["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
