"""Benchmark: training-step time and peak memory of SemaniGPT against taming's minGPT `GPT`.

    python scripts/bench/trans_train_step.py                    # CPU, 8 layers
    python scripts/bench/trans_train_step.py --full --device cuda

One training step = forward + cross-entropy + backward + AdamW step, with the same depth,
width, heads and sequence length (BOT/SOS + 128 text + 255 image inputs = 384 positions) and a
plain GELU MLP on both (our `ffn="gelu"`; sandwich norm and LayerScale stay on, as in the
paper). Both heads cover the same vocabulary: ours text + image heads, minGPT one head of
max(text, image) vocabulary over all positions (`--text-vocab 1024` by default so that both
heads do equal work; `--text-vocab 49408` is the paper's text head).
Each model runs in subprocesses of its own (alternating, `--rounds` each, medians); peak
memory is the peak RSS growth over the steps (CPU) or `torch.cuda.max_memory_allocated`
growth (CUDA). Prints one JSON line with the median wall and process-CPU seconds per step;
the time ratio uses CPU time on the CPU (steadier on a machine shared with other jobs; use
--threads 1) and wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time

import torch

log = logging.getLogger("bench.trans_train_step")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> dict:
    """Build one model, run the training steps, return its timing and memory."""
    from semani.modules.gpt import GPTConfig, SemaniGPT
    from semani.modules.trans_losses import token_cross_entropy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = GPTConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        ffn="gelu",
        text_vocab_size=args.text_vocab,
        text_eot_token=args.text_vocab - 1,
    )
    torch.manual_seed(0)
    B, Lt, Li = args.batch, cfg.text_len, cfg.image_len
    text = torch.randint(0, cfg.text_vocab_size - 1, (B, Lt), device=device)
    image = torch.randint(0, cfg.image_vocab_size, (B, Li), device=device)

    if args.worker == "ours":
        model = SemaniGPT(cfg).to(device).train()

        def loss_fn():
            out = model(text, image)
            # the losses as training computes them (rows of (B*L, V) logits)
            return (
                token_cross_entropy(out.text_logits, text).mean()
                + token_cross_entropy(out.image_logits, image).mean()
            )
    else:
        import transformers  # taming's mingpt imports a function transformers 5 removed

        if not hasattr(transformers, "top_k_top_p_filtering"):
            transformers.top_k_top_p_filtering = None  # unused in training (benchmark only)
        from taming.modules.transformer.mingpt import GPT

        vocab = max(cfg.text_vocab_size, cfg.image_vocab_size)
        model = GPT(vocab, Lt + Li, cfg.n_layer, cfg.n_head, cfg.n_embd).to(device).train()
        sos = torch.zeros(B, 1, dtype=torch.long, device=device)
        idx = torch.cat([sos, text, image[:, :-1]], 1)  # (B, 384)
        targets = torch.cat([text, image], 1)  # (B, 384)

        def loss_fn():
            return model(idx, targets=targets)[1]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())

    def step() -> tuple[float, float]:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    rss0 = _rss_bytes()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        step()
    walls, cpus = zip(*(step() for _ in range(args.steps)))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - mem0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(rss0, peak0)
    return {
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "peak_mem_mb": peak / 2**20,
        "params": n_params,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--full", action="store_true", help="paper size: 24 layers")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per model (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker", choices=["ours", "mingpt"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.full:
        args.n_layer = 24
    if args.worker:
        print(json.dumps(worker(args)))
        return
    logging.basicConfig(level=logging.INFO)
    runs: dict[str, list[dict]] = {"mingpt": [], "ours": []}
    for _ in range(args.rounds):  # alternate the subprocesses so both see the same load
        for name in runs:
            cmd = (
                [sys.executable, __file__, "--worker", name]
                + [a for a in sys.argv[1:] if a != "--full"]
                + (["--n-layer", "24"] if args.full else [])
            )
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            log.info("%s: %s", name, runs[name][-1])
    res = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    for r in res.values():
        r["params"] = int(r["params"])
    ours, ref = res["ours"], res["mingpt"]
    basis = "cpu" if args.device == "cpu" else "wall"  # CPU time is steadier on a shared CPU
    print(
        json.dumps(
            {
                "bench": "trans_train_step",
                "device": args.device,
                "threads": args.threads or torch.get_num_threads(),
                "model": {
                    "n_layer": args.n_layer,
                    "n_embd": args.n_embd,
                    "n_head": args.n_head,
                    "seq_len": 384,
                    "ffn": "gelu",
                    "text_vocab": args.text_vocab,
                    "batch": args.batch,
                },
                "mingpt_vocab": max(args.text_vocab, 1024),
                "steps": args.steps,
                "rounds": args.rounds,
                "ours": {k: round(v, 4) for k, v in ours.items()},
                "mingpt": {k: round(v, 4) for k, v in ref.items()},
                "time_basis": basis,
                "time_ratio": round(ours[f"{basis}_s"] / ref[f"{basis}_s"], 3),
                "mem_ratio": round(ours["peak_mem_mb"] / max(ref["peak_mem_mb"], 1e-9), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
