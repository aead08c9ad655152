"""Benchmark: seconds per image of SeMani-Trans sampling against taming-transformers' minGPT.

    python scripts/bench/trans_sampling.py --tokens 32 --batch 1 --device cpu
    python scripts/bench/trans_sampling.py --tiny            # quick smoke run

At the paper's size (24 layers, width 512, 8 heads, 128 text + 256 image tokens, random
weights) it times the last `--tokens` image tokens of a sequence whose earlier image tokens are
given (forced / prefix), for
  (a) ours, static KV cache           (semani.manipulation.sampling, use_cache=True)
  (b) ours, no cache                  (full forward per token, use_cache=False)
  (c) minGPT `sample()`               (taming.modules.transformer.mingpt, no cache)
  (d) minGPT `sample_with_past()`     (cache grown with torch.cat every step)
with the same depth, width, heads and sequence length (minGPT: one vocabulary of the image
codebook size, text ids folded into it, a plain GELU MLP; ours: the same GELU MLP by default so
that both run the same network, `--ffn geglu` for the paper's GEGLU, which costs ~1/3 more per
token; our sandwich norm and LayerScale stay on). When `--tokens` < 256 it also times (a)
and (d) on a full 256-token image. Prints one JSON line: wall and process-CPU seconds per
image; the ratios use CPU time on the CPU (steadier on a shared machine; use --threads 1) and
wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable

import torch

from semani.manipulation.sampling import sample_image_tokens, top_k_k
from semani.modules.gpt import GPTConfig, SemaniGPT

log = logging.getLogger("bench.trans_sampling")


def _import_mingpt():
    """taming's mingpt imports `transformers.top_k_top_p_filtering`, which transformers 5
    removed: give it a top-k stand-in before importing (benchmark only)."""
    import transformers

    def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, **_):
        if top_p is not None and top_p < 1.0:
            raise NotImplementedError("stand-in supports top-k only")
        if top_k:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return logits

    if not hasattr(transformers, "top_k_top_p_filtering"):
        transformers.top_k_top_p_filtering = top_k_top_p_filtering
    from taming.modules.transformer import mingpt

    return mingpt


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _medians(fns: dict[str, Callable[[], object]], device, reps: int, batch: int) -> dict:
    """Median wall and CPU seconds per image of each function over `reps` rounds; the rounds
    interleave the functions so that they see the same machine load."""
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    out = {}
    for name, ts in times.items():
        walls, cpus = zip(*ts)
        out[name] = {
            "wall": statistics.median(walls) / batch,
            "cpu": statistics.median(cpus) / batch,
        }
        log.info("%s: %s s/image", name, out[name])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="image tokens generated (32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="2 layers, width 64: a smoke run")
    p.add_argument("--filter-thres", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--ffn",
        choices=["gelu", "geglu"],
        default="gelu",
        help="our FFN: gelu = the same network as minGPT; geglu = the paper's",
    )
    p.add_argument("--repeats", type=int, default=3, help="median over runs of (a) and (d)")
    p.add_argument("--no-full", action="store_true", help="skip the full-image (a)/(d) timing")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mingpt = _import_mingpt()

    cfg = GPTConfig.tiny(ffn=args.ffn) if args.tiny else GPTConfig(ffn=args.ffn)
    if args.tokens is None:
        args.tokens = min(32, cfg.image_len // 2)
    if not 1 <= args.tokens <= cfg.image_len:
        raise SystemExit(f"--tokens must be in [1, {cfg.image_len}]")
    torch.manual_seed(0)
    ours = SemaniGPT(cfg).to(device).eval()
    theirs = (
        mingpt.GPT(
            vocab_size=cfg.image_vocab_size,
            block_size=cfg.text_len + cfg.image_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
        )
        .to(device)
        .eval()
    )

    B, Lt, Li, N = args.batch, cfg.text_len, cfg.image_len, args.tokens
    text = torch.randint(1, 49000, (B, Lt), device=device)
    text[:, 0], text[:, Lt // 2], text[:, Lt // 2 + 1 :] = 49406, cfg.text_eot_token, 0
    image = torch.randint(0, cfg.image_vocab_size, (B, Li), device=device)
    k = top_k_k(cfg.image_vocab_size, args.filter_thres)
    prefix = torch.cat([text % cfg.image_vocab_size, image], 1)  # minGPT's single vocabulary

    def ours_fn(n: int, use_cache: bool) -> Callable[[], object]:
        mask = torch.zeros(B, Li, dtype=torch.bool, device=device)
        mask[:, Li - n :] = True  # re-sample the last n tokens, the rest are forced
        gen = torch.Generator(device=device).manual_seed(0)
        kw = dict(filter_thres=args.filter_thres, generator=gen, use_cache=use_cache)
        return lambda: sample_image_tokens(ours, text, image, mask, **kw)

    def sample_fn(n: int) -> Callable[[], object]:
        x = prefix[:, : Lt + Li - n]
        return lambda: mingpt.sample(theirs, x, steps=n, sample=True, top_k=k)

    def past_fn(n: int) -> Callable[[], object]:
        x = prefix[:, : Lt + Li - n]
        return lambda: mingpt.sample_with_past(x, theirs, steps=n, top_k=k)

    runs = {
        "a_ours_static_cache": ours_fn(N, True),
        "b_ours_no_cache": ours_fn(N, False),
        "c_mingpt_sample": sample_fn(N),
        "d_mingpt_sample_with_past": past_fn(N),
    }
    with torch.inference_mode():
        for fn in (ours_fn(2, True), ours_fn(2, False), sample_fn(2), past_fn(2)):  # warm-up
            fn()
        cached = {n: runs[n] for n in ("a_ours_static_cache", "d_mingpt_sample_with_past")}
        secs = _medians(cached, device, args.repeats, B)  # fast: median of --repeats
        for name in ("b_ours_no_cache", "c_mingpt_sample"):  # slow: once each
            secs.update(_medians({name: runs[name]}, device, 1, B))
        full = {}
        if N < Li and not args.no_full:
            full_fns = {"a_ours_static_cache": ours_fn(Li, True)}
            full_fns["d_mingpt_sample_with_past"] = past_fn(Li)
            full = _medians(full_fns, device, args.repeats, B)

    # on a CPU shared with other jobs the process CPU time is the steadier measure
    basis = "cpu" if device.type == "cpu" else "wall"
    a = secs["a_ours_static_cache"][basis]
    result = {
        "bench": "trans_sampling",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": {
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "text_len": Lt,
            "image_len": Li,
            "ours_ffn": cfg.ffn,
            "mingpt_ffn": "gelu",
            "mingpt_vocab": cfg.image_vocab_size,
        },
        "batch": B,
        "tokens_generated": N,
        "note": f"last {N} of {Li} image tokens sampled, earlier ones given (prefill/prefix)",
        "top_k": k,
        "repeats_a_d": args.repeats,
        "wall_s_per_image": {n: round(v["wall"], 4) for n, v in secs.items()},
        "cpu_s_per_image": {n: round(v["cpu"], 4) for n, v in secs.items()},
        "ratio_basis": basis,
        "time_over_a": {
            n: round(v[basis] / a, 2) for n, v in secs.items() if n != "a_ours_static_cache"
        },
    }
    if full:
        result["full_image_wall_s_per_image"] = {n: round(v["wall"], 4) for n, v in full.items()}
        result["full_image_cpu_s_per_image"] = {n: round(v["cpu"], 4) for n, v in full.items()}
        result["full_image_d_over_a"] = round(
            full["d_mingpt_sample_with_past"][basis] / full["a_ours_static_cache"][basis], 2
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
