"""SeMani-Diff building blocks: Stable-Diffusion components, offline, tiny or loaded.

Everything here is diffusers / transformers classes; nothing is re-implemented.

- `offline_clip_tokenizer`: a `transformers.CLIPTokenizer` written from open_clip's shipped BPE
  file (no hub download), identical to OpenAI's CLIP vocabulary (49408 entries).
- `tiny_inpaint_components`: seeded tiny random components in the SD-1.5 layout (VAE factor 8,
  9-channel inpainting UNet or 4-channel text-to-image UNet) for tests and benchmarks.
- `load_inpaint_components` / `load_sd_components`: components from a diffusers folder
  (`model_index.json`), a Hugging Face hub id (downloaded by diffusers into the hub cache, or
  read from it when offline: `HF_HUB_OFFLINE=1`, see `semani.utils.hub`), or a single-file
  checkpoint.
- `encode_text`, `sample_latents`, `decode_latents`, `latent_mask`, `vae_scale_factor`: the few
  operations that the editors (`semani.manipulation.diff_editor`, `.blended`) and the training
  module share, with diffusers' Stable-Diffusion conventions (scaling factor, padding).

The components are a plain dict with the keys of `COMPONENTS`.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from semani.utils.hub import (
    download_error,
    first_line,
    hub_cache_dir,
    looks_like_hub_id,
    not_cached_error,
    offline_scope,
)

log = logging.getLogger(__name__)

__all__ = [
    "COMPONENTS",
    "SD15_SHAPES",
    "decode_latents",
    "encode_text",
    "tokenize_text",
    "latent_mask",
    "load_inpaint_components",
    "load_sd_components",
    "offline_clip_tokenizer",
    "sample_latents",
    "tiny_inpaint_components",
    "tiny_vae",
    "vae_scale_factor",
]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Stable Diffusion's noise schedule (v1 and v2)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# `tiny_inpaint_components(**SD15_SHAPES)`: random weights in SD-1.5's shapes (UNet ~860M)
SD15_SHAPES = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    text_layers=12,
    text_heads=12,
)
# `tiny_inpaint_components(**SD2_SHAPES)`: SD-2(-inpainting)'s shapes (UNet 865.9M with 9 input
# channels): per-level attention heads of 64 channels, linear projections in the transformers,
# and the OpenCLIP ViT-H/14 text tower in transformers' CLIPTextModel form (1024 wide, 23
# layers, 16 heads, GELU); its tokenizer pads with "!"
SD2_SHAPES = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    text_layers=23,
    text_heads=16,
    text_act="gelu",
    pad_token="!",
)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's vocabulary (49408 entries) and its 48894 merges from the BPE .gz file."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the first line is a version header
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += [SOT, EOT]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: {len(vocab)} vocabulary entries, not {CLIP_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "semani" / "clip_tokenizer"


def offline_clip_tokenizer(
    folder: str | os.PathLike | None = None,
    bpe_path: str | os.PathLike | None = None,
    model_max_length: int = CLIP_CONTEXT_LENGTH,
):
    """A `transformers.CLIPTokenizer` built offline from open_clip's shipped BPE vocabulary.

    Writes `vocab.json`, `merges.txt` and `tokenizer_config.json` (as OpenAI's CLIP / SD-1.x
    tokenizer folders have them: pad = `<|endoftext|>`, 77 tokens) into `folder` (default
    `$XDG_CACHE_HOME/semani/clip_tokenizer`) unless they are there, then loads the folder.
    Gives the same ids as `open_clip.get_tokenizer("ViT-B-32")` on plain text.
    """
    folder = Path(folder) if folder is not None else _default_cache_dir()
    files = ("vocab.json", "merges.txt", "tokenizer_config.json")
    if not all((folder / f).is_file() for f in files):
        if bpe_path is None:
            from open_clip.tokenizer import default_bpe

            bpe_path = default_bpe()
        vocab, merges = _clip_vocab_and_merges(bpe_path)
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model_max_length,
            "bos_token": SOT,
            "eos_token": EOT,
            "pad_token": EOT,
            "unk_token": EOT,
            "do_lower_case": True,
        }
        folder.mkdir(parents=True, exist_ok=True)
        # write into a temporary folder next to it and move the files: concurrent processes
        # (DDP ranks) never read a half-written file
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
            for f in files:
                os.replace(Path(tmp) / f, folder / f)
        log.info("wrote the CLIP tokenizer (from %s) to %s", bpe_path, folder)
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(folder), model_max_length=model_max_length, local_files_only=True
    )


# ---------------------------------------------------------------------------------------------
# tiny random components


def tiny_vae(
    seed: int = 0,
    channels: Sequence[int] = (16, 16, 32, 32),
    layers_per_block: int = 1,
    latent_size: int = 8,
) -> Any:
    """A seeded random `AutoencoderKL` in SD's layout at toy widths: 4 latent channels, one
    level per entry of `channels` (4 levels: SD's latent factor 8 = 2 ** (levels - 1)); the
    global RNG is restored afterwards. `latent_size`: the nominal latent side."""
    from diffusers import AutoencoderKL

    m = len(channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * m,
            up_block_types=("UpDecoderBlock2D",) * m,
            block_out_channels=tuple(channels),
            layers_per_block=layers_per_block,
            latent_channels=4,
            norm_num_groups=min(32, channels[0]),
            sample_size=latent_size * 2 ** (m - 1),
        )


def tiny_inpaint_components(
    seed: int = 0,
    in_channels: int = 9,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int | Sequence[int] = 8,
    vae_channels: tuple[int, ...] = (16, 16, 32, 32),
    vae_layers_per_block: int = 1,
    text_layers: int = 2,
    text_heads: int = 4,
    tokenizer_folder: str | os.PathLike | None = None,
    use_linear_projection: bool = False,
    text_act: str = "quick_gelu",
    pad_token: str | None = None,
) -> dict[str, Any]:
    """Seeded tiny random SD components: the SD-1.5 layout at toy widths (or SD-2's).

    Args:
        seed: every module is initialised under `torch.manual_seed(seed)` (the global RNG is
            restored afterwards).
        in_channels: 9 (inpainting: noisy latent + mask + masked-image latent) or 4
            (text-to-image, for the blended-latent baseline).
        sample_size: the UNet's nominal latent side (images of any multiple of 8 work).
        block_out_channels, layers_per_block, cross_attention_dim, attention_head_dim: the
            UNet; cross-attention blocks on every level but the deepest, as SD.
        vae_channels, vae_layers_per_block: the VAE; 4 levels give SD's latent factor 8
            (2 ** (levels - 1)).
        text_layers, text_heads: the CLIP text transformer (vocabulary 49408, 77 positions,
            width `cross_attention_dim`, MLP 4x).
        `tiny_inpaint_components(**SD15_SHAPES)` has SD-1.5(-inpainting)'s shapes,
        `**SD2_SHAPES` SD-2(-inpainting)'s.
        use_linear_projection: the UNet's transformers project with linear layers (SD-2).
        text_act: the text tower's activation ("quick_gelu": OpenAI CLIP, SD-1.5; "gelu":
            OpenCLIP ViT-H, SD-2).
        pad_token: the tokenizer's padding token (None: the end token, SD-1.5; "!": SD-2).
        tokenizer_folder: where the offline CLIP tokenizer is cached (see
            `offline_clip_tokenizer`).
    Returns:
        {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} (scheduler: DDIM with SD's
        scaled-linear betas 0.00085..0.012 over 1000 steps).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if in_channels not in (4, 9):
        raise ValueError(f"in_channels must be 9 (inpainting) or 4 (text-to-image): {in_channels}")
    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim,
            use_linear_projection=use_linear_projection,
            norm_num_groups=min(32, block_out_channels[0]),
        )
        vae = tiny_vae(seed, vae_channels, vae_layers_per_block, sample_size)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=cross_attention_dim,
                intermediate_size=4 * cross_attention_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=text_heads,
                hidden_act=text_act,
                max_position_embeddings=CLIP_CONTEXT_LENGTH,
                bos_token_id=CLIP_VOCAB_SIZE - 2,
                eos_token_id=CLIP_VOCAB_SIZE - 1,
                pad_token_id=CLIP_VOCAB_SIZE - 1,
            )
        )
    tokenizer = offline_clip_tokenizer(tokenizer_folder)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD_SCHEDULER),
    }


# ---------------------------------------------------------------------------------------------
# loading

_SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


def _load_folder(folder: Path, torch_dtype: torch.dtype | None) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no model_index.json: pass the folder of a diffusers pipeline save "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. what "
            "StableDiffusionInpaintPipeline.save_pretrained writes"
        )
    index = json.loads(index_file.read_text())
    missing = [name for name in COMPONENTS if not (index.get(name) or [None])[0]]
    if missing:
        raise ValueError(f"{index_file} names no {missing}; an SD folder has all of {COMPONENTS}")
    out: dict[str, Any] = {}
    for name in COMPONENTS:
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": True}
        if torch_dtype is not None and isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            kwargs["torch_dtype"] = torch_dtype
        if library == "diffusers" and importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to, said once here
        out[name] = cls.from_pretrained(str(folder), **kwargs)
    names = ", ".join(f"{k}={type(v).__name__}" for k, v in out.items())
    log.info("loaded %s from %s", names, folder)
    return out


def _load_single_file(
    path: Path, config: str | os.PathLike | None, inpaint: bool, torch_dtype: torch.dtype | None
) -> dict[str, Any]:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"safety_checker": None}
    if config is not None:
        kwargs["config"] = str(config)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    with offline_scope() as offline:
        try:
            pipe = cls.from_single_file(str(path), local_files_only=offline, **kwargs)
        except Exception as err:  # diffusers raises several types when configs are not found
            how = (
                "offline, the configs must be local or cached"
                if offline
                else "diffusers fetches the matching configs from the Hugging Face hub"
            )
            raise OSError(
                f"could not read the single-file checkpoint {path} ({first_line(err)}). A "
                f"single file holds weights only ({how}): pass config=<a diffusers folder, or a "
                "hub id, of the same architecture (model_index.json and the component configs)>"
            ) from err
    log.info("loaded %s from the single file %s", cls.__name__, path)
    return {name: getattr(pipe, name) for name in COMPONENTS}


def _download(repo_id: str, what: str | None) -> Path:
    """The local snapshot of a hub pipeline: diffusers downloads what the pipeline needs into
    the hub cache (its progress bars; the root single-file checkpoints are skipped), or, offline,
    finds it there."""
    from diffusers import DiffusionPipeline

    cache_dir = hub_cache_dir()
    with offline_scope() as offline:
        try:
            folder = DiffusionPipeline.download(
                repo_id, cache_dir=cache_dir, local_files_only=offline
            )
        except Exception as err:
            if offline:
                raise not_cached_error(repo_id, what=what, cache_dir=cache_dir) from err
            raise download_error(repo_id, err, what) from err
    log.info("%s: %s (Hugging Face cache)", repo_id, folder)
    return Path(folder)


def load_sd_components(
    source: str | os.PathLike,
    *,
    inpaint: bool = True,
    config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    what: str | None = None,
) -> dict[str, Any]:
    """Stable-Diffusion components from a folder, a Hugging Face hub id or a single file.

    Args:
        source: a diffusers folder (`model_index.json` layout, what
            `StableDiffusion[Inpaint]Pipeline.save_pretrained` writes); a hub id such as
            "stabilityai/stable-diffusion-2-inpainting" (diffusers downloads it into the hub
            cache, or reads it from there when offline, `HF_HUB_OFFLINE=1`); or a single-file
            checkpoint (`.ckpt`, `.safetensors`) read with diffusers' `from_single_file`.
        inpaint: for single files, read an inpainting (9-channel) or a text-to-image model.
        config: for single files, the diffusers folder (or hub id) whose configs describe the
            architecture.
        torch_dtype: load the models in this dtype.
        what: the config key `source` came from (e.g. "editor.source"), for error messages.
    Returns:
        {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} (the source's own classes,
        not frozen, on the CPU).
    Raises:
        FileNotFoundError naming the path (or hub id) and what to pass instead
        (`semani.utils.hub.NotInCacheError` offline); `semani.utils.hub.HubDownloadError` when
        the hub refuses or fails.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if path.is_file():
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"{path} is a file but not a checkpoint ({', '.join(_SINGLE_FILE_SUFFIXES)}); "
                "pass a diffusers folder or a single-file checkpoint"
            )
        return _load_single_file(path, config, inpaint, torch_dtype)
    if path.suffix in _SINGLE_FILE_SUFFIXES:
        raise FileNotFoundError(f"no checkpoint file {path} (absolute: {path.resolve()})")
    if looks_like_hub_id(text):
        return _load_folder(_download(text, what), torch_dtype)
    raise FileNotFoundError(
        f"no such folder {path} (absolute: {path.resolve()}); pass the folder of a diffusers "
        "pipeline save (model_index.json, unet/, vae/, ...), a Hugging Face hub id "
        "(org/name) or a single-file checkpoint"
    )


def load_inpaint_components(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    what: str | None = None,
) -> dict[str, Any]:
    """`load_sd_components` for an inpainting model (SD-inpainting's 9-channel UNet)."""
    return load_sd_components(
        source, inpaint=True, config=config, torch_dtype=torch_dtype, what=what
    )


# ---------------------------------------------------------------------------------------------
# shared operations (diffusers' Stable-Diffusion conventions)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1), 8 for Stable Diffusion."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tokenize_text(tokenizer, texts: list[str]) -> Tensor:
    """Texts -> (B, L) token ids as diffusers' SD pipelines make them: `padding="max_length"`
    to the tokenizer's length, truncated."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (B, L)


def encode_text(text_encoder, tokenizer, texts: list[str], ids: Tensor | None = None) -> Tensor:
    """Texts -> CLIP text-encoder hidden states (B, L, D), padded to the tokenizer's length.

    As diffusers' SD pipelines (`tokenize_text`), last hidden state, in the text encoder's dtype
    and on its device. `ids`: the texts already tokenized by `tokenize_text`.
    """
    ids = tokenize_text(tokenizer, texts) if ids is None else ids  # (B, L)
    return text_encoder(ids.to(text_encoder.device))[0]  # (B, L, D)


def sample_latents(vae, posterior, generator: torch.Generator | None = None) -> Tensor:
    """Scaled latents (B, C, H/f, W/f) from the VAE's posterior of (B, 3, H, W) pixels
    (`vae.encode(pixels).latent_dist`): a sample drawn from `generator` (diffusers'
    `latent_dist.sample(generator)`) times the VAE's `scaling_factor` (0.18215 for SD)."""
    return posterior.sample(generator) * vae.config.scaling_factor


def decode_latents(vae, latents: Tensor) -> Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [0, 1], float32."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel mask (B, 1, H, W) -> latent grid (B, 1, h, w), nearest neighbour (as diffusers)."""
    return F.interpolate(mask, size=tuple(size))  # (B, 1, h, w)
