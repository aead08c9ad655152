"""Benchmark: `DiffEditor` against diffusers' `StableDiffusionInpaintPipeline`.

    python scripts/bench/diff_editor.py                    # CPU, "small" random model, 1 thread
    python scripts/bench/diff_editor.py --size medium      # CPU, about a minute
    python scripts/bench/diff_editor.py --size sd15 --device cuda --dtype fp16 --steps 50
    python scripts/bench/diff_editor.py --size sd15 --device cuda --dtype fp16 --compile \\
        --channels-last

The same random components (`semani.modules.diffusion_parts.tiny_inpaint_components`; `sd15`:
SD-1.5-inpainting's shapes, UNet ~860M) run through both, with one seed, one DDIM schedule and
the same guidance, on a non-square image (`--height` x `--width`) with a rectangular mask. The
model objects are shared, so `--compile` (`unet.compile()`) and `--channels-last` apply to both.

Prints one JSON line:
- `max_abs_diff`: the images before the composite (`DiffEditor.generate` against the pipeline's
  `output_type="np"`), in [0, 1];
- `time_ratio`: ours / diffusers, medians of `--repeats` interleaved runs after a warm-up;
  process CPU time on the CPU (steadier on a shared machine; use --threads 1), wall time on
  CUDA; `edit_s` is our whole `edit`, with the resize and the pixel-space composite;
- `memory_ratio`: ours / diffusers peak memory: on CUDA the peak of
  `torch.cuda.max_memory_allocated` above what was allocated before the call; on the CPU the
  peak resident set (`ru_maxrss` from `os.wait4`) of a forked child that runs one call, above
  that of a forked child that does nothing (`memory_measure` says which).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from semani.manipulation.diff_editor import DiffEditor
from semani.modules.diffusion_parts import SD15_SHAPES, tiny_inpaint_components

log = logging.getLogger("bench.diff_editor")

SIZES = {  # component shapes, default image (height, width)
    "tiny": (dict(), (48, 80)),
    "small": (
        dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64),
        (96, 128),
    ),
    "medium": (
        dict(
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            cross_attention_dim=128,
            vae_channels=(32, 64, 128, 128),
            vae_layers_per_block=2,
            text_layers=4,
        ),
        (192, 256),
    ),
    "sd15": (SD15_SHAPES, (512, 640)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds of each `fn()` over `repeats` rounds; the functions
    take turns within a round, so a slower or busier machine affects them alike."""
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def _child_maxrss_kb(fn: Callable[[], object] | None) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            if fn is not None:
                fn()
        except BaseException:  # reported through the exit status
            code = 1
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the forked memory-measuring child failed")
    return usage.ru_maxrss  # KiB on Linux


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one `fn()` above the memory in use before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (_child_maxrss_kb(fn) - _child_maxrss_kb(None)) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--height", type=int, default=None, help="image height (default per size)")
    p.add_argument("--width", type=int, default=None, help="image width (default per size)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="unet.compile() (GPU)")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE channels-last")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes, (height, width) = SIZES[args.size]
    height, width = args.height or height, args.width or width
    parts = tiny_inpaint_components(seed=0, **shapes)
    editor = DiffEditor(
        **parts,
        steps=args.steps,
        guidance_scale=args.guidance,
        device=device,
        dtype=dtype,
        guidance_form="diffusers",  # the pipeline's form, for the comparison
    )
    if args.channels_last:
        parts["unet"].to(memory_format=torch.channels_last)
        parts["vae"].to(memory_format=torch.channels_last)
    if args.compile:
        parts["unet"].compile()
    pipe = StableDiffusionInpaintPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 5 : 4 * height // 5, width // 4 : 3 * width // 4] = True
    from PIL import Image

    pil_image, pil_mask = Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255)
    h8, w8 = height - height % editor.factor, width - width % editor.factor
    kw = dict(steps=args.steps, guidance_scale=args.guidance, num_images=args.num_images)

    def ours() -> torch.Tensor:
        return editor.generate(image, mask, "a red bird", seed=0, **kw)

    def theirs() -> np.ndarray:
        return pipe(
            "a red bird",
            image=pil_image,
            mask_image=pil_mask,
            height=h8,
            width=w8,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    def edit() -> object:
        return editor.edit(image, mask, "a red bird", seed=0, **kw)

    with torch.inference_mode():
        a, b = ours(), theirs()  # also the warm-up (and compilation)
        edit()
    max_diff = float(np.abs(a.permute(0, 2, 3, 1).float().cpu().numpy() - b).max())
    with torch.inference_mode():
        times = timed({"ours": ours, "diffusers": theirs, "edit": edit}, device, args.repeats)
    (ow, oc), (dw, dc), (ew, ec) = times["ours"], times["diffusers"], times["edit"]
    use_cpu = device.type == "cpu"
    out: dict = {
        "bench": "diff_editor",
        "size": args.size,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": args.dtype,
        "image": [height, width],
        "model_grid": [h8, w8],
        "steps": args.steps,
        "guidance": args.guidance,
        "num_images": args.num_images,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "max_abs_diff": max_diff,
        "ours_s": round(oc if use_cpu else ow, 4),
        "diffusers_s": round(dc if use_cpu else dw, 4),
        "edit_s": round(ec if use_cpu else ew, 4),
        "time_ratio": round((oc / dc) if use_cpu else (ow / dw), 3),
        "time_measure": "process_cpu_median" if use_cpu else "wall_median",
    }
    if not args.skip_memory:
        with torch.inference_mode():
            om, dm = peak_mb(ours, device), peak_mb(theirs, device)
        out.update(
            ours_peak_mb=round(om, 1),
            diffusers_peak_mb=round(dm, 1),
            memory_ratio=round(om / dm, 3) if dm > 0 else None,
            memory_measure=(
                "cuda_max_memory_allocated_above_start"
                if device.type == "cuda"
                else "forked_child_ru_maxrss_above_idle_child"
            ),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
