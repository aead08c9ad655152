"""A frozen open_clip model that scores images in [-1, 1] and captions.

`ClipModel(model_name, pretrained)` wraps `open_clip.create_model` and `open_clip.get_tokenizer`:

- `model_name`: any open_clip architecture (`"ViT-B-32"`, `"ViT-L-14"`, ...) or the tiny test
  architecture `"semani-tiny-ViT"` (a JSON in `semani/modules/clip_configs/`, registered with
  open_clip when this module is imported).
- `pretrained`: None (random init, tests), a local checkpoint file (an open_clip state dict, a
  `.safetensors` file, or OpenAI's TorchScript release such as `ViT-B-32.pt`), an open_clip
  tag (`"openai"`, `"laion2b_s34b_b79k"`), or a Hugging Face hub id holding open_clip weights
  (`open_clip_model.safetensors`). A tag is read from the caches when it is there (the Hugging
  Face cache for the tags open_clip fetches from the hub, `~/.cache/clip` for URL ones), else
  downloaded into them (huggingface_hub's progress bars), as `open_clip.create_model` does;
  offline (`HF_HUB_OFFLINE=1`, `semani.utils.hub.is_offline`) a tag that is not cached fails
  at once with one line naming the files and the command that gets them.
- `model_name` may also be open_clip's `hf-hub:org/name` (downloaded by open_clip; offline, the
  cached snapshot) or `local-dir:<folder>`.

`encode_image` takes generator outputs directly: (B, 3, H, W) in [-1, 1], resized
differentiably to the model's input size (bicubic, no antialias, shorter side then centre crop as
CLIP's preprocessing) and normalised with the model's mean/std inside. The model is frozen
(`eval()`, no gradients on its weights) and stays in eval mode when a parent calls `.train()`;
gradients still flow to the *input* images, which the CLIP semantic loss needs.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from semani.modules.clip_tokens import patch_features
from semani.utils.hub import (
    HubDownloadError,
    NotInCacheError,
    cached_snapshot,
    download_error,
    first_line,
    hub_cache_dir,
    is_offline,
    looks_like_hub_id,
    not_cached_error,
    offline_reason,
    offline_scope,
)

log = logging.getLogger(__name__)

__all__ = [
    "ClipModel",
    "TINY_CLIP_NAME",
    "CLIP_CONFIG_DIR",
    "clip_preprocess",
    "resolve_pretrained",
]

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
TINY_CLIP_NAME = "semani-tiny-ViT"  # embed 32, ViT 2 layers x 64 wide, 32 px, patch 8, ctx 77

if TINY_CLIP_NAME not in open_clip.list_models():
    open_clip.add_model_config(CLIP_CONFIG_DIR)

_HF_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive (OpenAI's CLIP release files are TorchScript)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def _tag_filenames(filename: str) -> list[str]:
    """The files of an open_clip hub entry, in the order open_clip tries them (safetensors
    first)."""
    if not filename:
        return list(_HF_DEFAULT_FILES)
    if filename.endswith((".bin", ".pth")):
        return [os.path.splitext(filename)[0] + ".safetensors", filename]
    return [filename]


def _cached_tag_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The local file of an open_clip pretrained tag if a cache holds it, else None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        for name in _tag_filenames(filename):
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir or hub_cache_dir())
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    url = tag_cfg.get("url", "")
    if url:
        target = os.path.join(
            cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url)
        )
        if os.path.isfile(target):
            return target
    return None


def _hub_file(repo_id: str, filenames: list[str], cache_dir: str | None, label: str) -> str:
    """The first of `filenames` in the hub repository `repo_id`: from the Hugging Face cache, or
    downloaded into it by huggingface_hub (not offline). One-line errors naming `label`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    cache = cache_dir or hub_cache_dir()
    last: Exception | None = None
    with offline_scope() as offline:
        for name in filenames:
            try:
                return hf_hub_download(
                    repo_id,
                    name,
                    cache_dir=cache,
                    local_files_only=offline,
                    library_name="open_clip",
                )
            except EntryNotFoundError as err:  # not in the repo, or (offline) not in the cache
                last = err
            except Exception as err:  # no such repository, gated, network error
                raise HubDownloadError(f"{label}: {download_error(repo_id, err)}") from err
    if offline:
        folder = f"pretrained/clip/{repo_id.rsplit('/', 1)[-1]}"
        err = not_cached_error(
            repo_id, what="pretrained", folder=folder, filename=filenames[0], cache_dir=cache
        )
        raise NotInCacheError(f"{label}: {err}") from last
    raise HubDownloadError(f"{label}: {download_error(repo_id, last)}") from last


def _fetch_tag(model_name: str, tag: str, tag_cfg: dict, cache_dir: str | None) -> str:
    """Download the weights of an open_clip tag that no cache holds (as open_clip would: the
    hub entry first, else the URL), or fail on one line when offline."""
    label = f"CLIP weights {model_name}/{tag}"
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        return _hub_file(repo_id, _tag_filenames(filename), cache_dir, label)
    url = tag_cfg.get("url", "")
    if not url:
        raise FileNotFoundError(f"{label}: open_clip names no source for them; pass a local file")
    folder = cache_dir or os.path.expanduser("~/.cache/clip")
    if is_offline():
        raise NotInCacheError(
            f"{label} are not in open_clip's cache ({folder}) and {offline_reason()}: download "
            f"{url} on a machine with a network and pass pretrained=<that file> (or put it in "
            f"{folder})"
        )
    try:
        return open_clip.pretrained.download_pretrained_from_url(url, cache_dir=cache_dir)
    except Exception as err:  # urllib's errors, a checksum mismatch
        raise HubDownloadError(
            f"could not download {label} from {url} ({first_line(err)})"
        ) from err


def resolve_pretrained(
    model_name: str, pretrained: str | None, cache_dir: str | None = None
) -> tuple[str | None, dict]:
    """Map `pretrained` to a local file: a file as it is; an open_clip tag or a hub id from the
    caches, downloaded into them when missing (unless offline).

    Returns (path or None, the open_clip tag config or {}). Raises FileNotFoundError for a path
    that does not exist (`NotInCacheError`: offline and not cached) and `HubDownloadError`
    when a download fails.
    """
    if pretrained is None or str(pretrained) == "":
        return None, {}
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        return str(path), {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if tag_cfg:
        cached = _cached_tag_file(tag_cfg, cache_dir)
        if cached is None:
            cached = _fetch_tag(model_name, str(pretrained), tag_cfg, cache_dir)
        return cached, tag_cfg
    if looks_like_hub_id(str(pretrained)):
        label = f"CLIP weights {pretrained}"
        return _hub_file(str(pretrained), list(_HF_DEFAULT_FILES), cache_dir, label), {}
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise FileNotFoundError(
        f"CLIP weights {pretrained!r}: no such file, and not an open_clip pretrained tag of "
        f"{model_name!r} (known tags: {tags or 'none'}) nor a Hugging Face hub id. Pass the path "
        "of a local checkpoint."
    )


def _hub_model_name(model_name: str, cache_dir: str | None) -> str:
    """open_clip's `hf-hub:org/name` as it can be created now: as it is online (open_clip
    downloads it), the cached snapshot as `local-dir:<folder>` offline."""
    repo_id = model_name.removeprefix("hf-hub:")
    if not is_offline():
        return model_name
    cache = cache_dir or hub_cache_dir()
    folder = cached_snapshot(repo_id, cache)
    if folder is None:
        local = f"pretrained/clip/{repo_id.rsplit('/', 1)[-1]}"
        then = f"pass model_name=local-dir:{local}"
        raise not_cached_error(repo_id, folder=local, cache_dir=cache, then=then)
    return f"local-dir:{folder}"


def clip_preprocess(images: Tensor, size: tuple[int, int], mean: Tensor, std: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, h, w) CLIP input, differentiable: bicubic resize of the
    shorter side to `size` (no antialias), centre crop, then the CLIP mean/std (shaped to
    broadcast, e.g. (1, 3, 1, 1)). Training (`ClipTrainModule`) and use (`ClipModel`) share it."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    th, tw = size
    H, W = images.shape[-2:]
    if (H, W) != (th, tw):
        scale = max(th / H, tw / W)  # shorter side to the target, then centre crop
        rh, rw = max(th, round(H * scale)), max(tw, round(W * scale))
        images = F.interpolate(
            images, size=(rh, rw), mode="bicubic", align_corners=False, antialias=False
        )  # (B, 3, rh, rw)
        top, left = (rh - th) // 2, (rw - tw) // 2
        images = images[..., top : top + th, left : left + tw]  # (B, 3, th, tw)
    x = (images + 1) / 2  # [0, 1]
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


class ClipModel(nn.Module):
    """Frozen open_clip model with [-1, 1] image input and caption/tensor text input.

    Args:
        model_name: open_clip architecture name (or `TINY_CLIP_NAME` for tests), or
            `hf-hub:org/name` / `local-dir:<folder>` (open_clip's schemas).
        pretrained: None, a local checkpoint path, an open_clip tag or a hub id holding
            open_clip weights (`resolve_pretrained`: cached, else downloaded unless offline).
        image_size: override the architecture's input size (random-init/tests, or a checkpoint
            whose positional embedding open_clip resizes).
        cache_dir: where the tag weights are cached (open_clip's `cache_dir`; default: the
            Hugging Face cache, `~/.cache/clip` for URL tags).
        allow_download: deprecated and ignored (tags download unless offline).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        image_size: int | None = None,
        cache_dir: str | None = None,
        allow_download: bool | None = None,
    ) -> None:
        super().__init__()
        if allow_download is not None:
            warnings.warn(
                "ClipModel(allow_download=...) is deprecated and ignored: open_clip tags are "
                "downloaded into the cache unless HF_HUB_OFFLINE=1",
                FutureWarning,
                stacklevel=2,
            )
        self.model_name = model_name
        kwargs: dict = {"force_image_size": image_size} if image_size else {}
        create_name = model_name
        if model_name.startswith("hf-hub:"):
            create_name, source, tag_cfg = _hub_model_name(model_name, cache_dir), None, {}
        elif model_name.startswith("local-dir:"):
            source, tag_cfg = None, {}
        else:
            source, tag_cfg = resolve_pretrained(model_name, pretrained, cache_dir)
        if tag_cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        tag_pre = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
        if tag_pre:
            kwargs["force_preprocess_cfg"] = tag_pre

        tok_name = create_name
        if not create_name.startswith(("hf-hub:", "local-dir:")):
            tok_name = create_name.replace("/", "-")
        try:
            if source is not None and os.path.isfile(source) and _is_torchscript(source):
                # OpenAI's release files (ViT-B-32.pt): open_clip rebuilds it from the archive
                model = open_clip.load_openai_model(source, precision="fp32", device="cpu")
            else:
                model = open_clip.create_model(
                    create_name, pretrained=source, cache_dir=cache_dir, **kwargs
                )
            self.tokenizer = open_clip.get_tokenizer(tok_name)
        except OSError as err:
            if not create_name.startswith("hf-hub:"):
                raise
            raise download_error(create_name.removeprefix("hf-hub:"), err) from err
        self.model = model.eval().requires_grad_(False)

        pre = getattr(model.visual, "preprocess_cfg", None) or {}
        mean, std = pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        size = model.visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.context_length: int = int(getattr(model, "context_length", 77))
        self.embed_dim: int = int(self.encode_text(["a"]).shape[-1])
        self.eval()  # frozen: the wrapper itself too (see `train`)
        n = sum(p.numel() for p in self.model.parameters())
        log.info(
            "CLIP %s loaded from %s: %.1fM parameters (frozen), input %s, embed dim %d",
            model_name, source or "random init", n / 1e6, self.image_size, self.embed_dim,
        )  # fmt: skip

    def train(self, mode: bool = True) -> ClipModel:
        """The wrapper is a frozen scorer: it stays in eval mode whatever the parent asks."""
        return super().train(False)

    # ---------------------------------------------------------------- images

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, h, w) CLIP input, differentiable."""
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) image embeddings (L2-normalised by default)."""
        return self.model.encode_image(self.preprocess(images), normalize=normalize)

    def encode_image_tokens(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, N, D) patch-token embeddings in the joint space.

        The patch tokens after the final LayerNorm, through the same projection as the pooled
        embedding (what FILIP-style token-wise similarity uses with a plain CLIP ViT). The grid
        is `(h / patch, w / patch)` in row-major order.
        """
        return patch_features(self.model, self.preprocess(images), normalize=normalize)

    # ---------------------------------------------------------------- text

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Captions -> (B, context_length) token ids with this model's tokenizer."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.mean.device)

    def fit_context(self, tokens: Tensor) -> Tensor:
        """Pad or truncate (B, L) CLIP-BPE ids to the model's context; truncation keeps EOT."""
        L, ctx = tokens.shape[1], self.context_length
        if L < ctx:
            return F.pad(tokens, (0, ctx - L), value=0)
        if L == ctx:
            return tokens
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:
            raise ValueError(
                f"text tokens have length {L} > the CLIP context {ctx} and this tokenizer has no "
                f"EOT id to keep; pass the captions as strings instead"
            )
        out = tokens[:, :ctx].clone()  # (B, ctx)
        lost = ~(out == eot).any(dim=1) & (tokens == eot).any(dim=1)  # EOT was cut off
        out[lost, -1] = eot
        return out

    def encode_text(self, text: Sequence[str] | str | Tensor, normalize: bool = True) -> Tensor:
        """Captions, or (B, L) token ids, -> (B, D) text embeddings (L2-normalised by default)."""
        if isinstance(text, Tensor):
            if text.dim() != 2 or text.dtype != torch.long:
                raise ValueError(
                    f"text tokens must be a (B, L) LongTensor, got {tuple(text.shape)}"
                )
            tokens = self.fit_context(text.to(self.mean.device))
        else:
            tokens = self.tokenize(text)
        return self.model.encode_text(tokens, normalize=normalize)

    def similarity(self, images: Tensor, text: Sequence[str] | Tensor) -> Tensor:
        """Paired cosine similarity (B,) between images in [-1, 1] and their texts."""
        return (self.encode_image(images) * self.encode_text(text)).sum(-1)
