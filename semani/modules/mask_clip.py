"""OVSeg's mask-prompted CLIP image encoder: one global embedding per masked entity crop.

`MaskPromptCLIP` wraps a frozen open_clip ViT (`ClipModel`) and adds one learnable parameter,
`mask_embedding` (depth, grid², width), the *mask prompt* of OVSeg (Liang et al., CVPR 2023).
For a masked crop and its pixel mask:

1. the pixel mask is average-pooled per patch and ceil-ed: a patch with any foreground pixel is
   foreground (m = 1), a fully masked patch is background (m = 0);
2. right after the patch embedding, before the class token and the positional embedding,
   `x = x * m + mask_embedding[0] * (1 - m)`;
3. after each of the blocks 1 .. depth-1 the patch tokens (never the class token) are replaced
   the same way with `mask_embedding[d]`;
4. the class token goes through `ln_post` and `proj` as in open_clip's own forward.

`mask_embedding` starts at zeros (as OVSeg's), so the behaviour is defined before any training:
background patches become zero tokens (plus their positional embedding). With every pixel in the
foreground the result is exactly open_clip's `encode_image`. Depth 0 is a plain CLIP.

`masked_crops` cuts the entity crops as OVSeg does: the mask's bounding box, background pixels set
to the CLIP mean colour, resized (bicubic; the mask nearest) to the CLIP input size; `square=True`
pads the box to a square with the mean colour first (the paper's wording). All K entities of an
image go through the ViT in one batched forward (`encode_entities`).

Weights: `model_name`/`pretrained` as `ClipModel` takes them (open_clip names, local files,
cached tags; no network), or `ovseg_ckpt`, one of OVSeg's released detectron2 checkpoints
(`ovseg_swinbase_vitL14_ft_mpt.pth`, `ovseg_R101c_vitB16_ft_mpt.pth`): a dict whose "model" holds
`clip_adapter.clip_model.*` in OpenAI's CLIP layout (QuickGELU), `visual.mask_embedding`
included. It is loaded strictly; a mismatch names the keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from semani.modules.clip import ClipModel
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_strict,
    state_fingerprint,
)
from semani.utils.masks import masked_crops

log = logging.getLogger(__name__)

__all__ = [
    "OVSEG_CLIP_PREFIX",
    "MaskPromptCLIP",
    "masked_crops",
    "patch_foreground",
    "quickgelu_name",
    "read_ovseg_clip_state",
]

OVSEG_CLIP_PREFIX = "clip_adapter.clip_model."
# keys of OpenAI's TorchScript state dicts that are attributes, not weights, in open_clip
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def patch_foreground(masks: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """Pixel masks (K, S, S) -> (K, grid², 1) float in {0, 1}: 1 where a patch has any foreground.

    OVSeg's rule: average-pool the mask per patch, then ceil.
    """
    m = F.avg_pool2d(masks.float()[:, None], patch_size, stride=patch_size)  # (K, 1, g, g)
    return torch.ceil(m).flatten(1)[..., None]  # (K, g², 1)


def read_ovseg_clip_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The CLIP of an OVSeg (detectron2) checkpoint: `model["clip_adapter.clip_model.*"]`.

    Returns the state dict without the prefix (OpenAI CLIP layout, `visual.mask_embedding`
    included). Raises KeyError naming what the file holds when it is not such a checkpoint.
    """
    ckpt = load_checkpoint(path)
    model = ckpt.get("model")
    if not isinstance(model, Mapping):
        keys = ", ".join(sorted(map(str, ckpt))[:10]) or "nothing"
        raise KeyError(
            f"'{path}' is not an OVSeg (detectron2) checkpoint: no 'model' dict (top-level keys: "
            f"{keys}). Pass OVSeg's ovseg_*_ft_mpt.pth, or open_clip weights as pretrained="
        )
    sd = {
        k[len(OVSEG_CLIP_PREFIX) :]: v for k, v in model.items() if k.startswith(OVSEG_CLIP_PREFIX)
    }
    if not sd:
        prefixes = ", ".join(sorted({str(k).split(".")[0] + "." for k in model})) or "none"
        raise KeyError(
            f"'{path}' has no '{OVSEG_CLIP_PREFIX}*' weights (its model's prefixes: {prefixes}); "
            "expected one of OVSeg's released ovseg_*_ft_mpt.pth checkpoints"
        )
    for k in _OPENAI_NON_WEIGHTS:
        sd.pop(k, None)
    return sd


def quickgelu_name(model_name: str) -> str:
    """OVSeg's CLIP is OpenAI's code (QuickGELU): the open_clip name with that activation."""
    if "quickgelu" in model_name or model_name.startswith("local-dir:"):
        return model_name
    name = f"{model_name}-quickgelu"
    if name not in open_clip.list_models():
        raise ValueError(
            f"OVSeg checkpoints use QuickGELU, and open_clip has no {name!r}; pass a QuickGELU "
            f"architecture as model_name (e.g. 'ViT-L-14-quickgelu' or 'ViT-B-16-quickgelu')"
        )
    return name


class MaskPromptCLIP(nn.Module):
    """Frozen open_clip ViT + a learnable mask prompt (`mask_embedding`, zeros at start).

    Args:
        model_name: open_clip architecture (a ViT); with `ovseg_ckpt` its QuickGELU variant is
            used (`ViT-L-14` -> `ViT-L-14-quickgelu`).
        pretrained: CLIP weights as `ClipModel` takes them (None: random init); ignored with
            `ovseg_ckpt`, which holds the CLIP too.
        depth: mask-prompt depth (OVSeg: 3): row 0 replaces background patch tokens at the input,
            row d after block d. 0 = plain CLIP.
        ovseg_ckpt: path of an OVSeg `ovseg_*_ft_mpt.pth` (CLIP + mask prompt, loaded strictly).
        clip: an already built `ClipModel` to use instead of `model_name`/`pretrained`.
        square: crops padded to a square (paper) instead of OVSeg's stretched boxes.
        region: "box" (OVSeg's: the entity's bounding box) or "image" (the paper's masked
            image: the whole input with every non-entity pixel the mean colour).
    """

    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        depth: int = 3,
        ovseg_ckpt: str | None = None,
        clip: ClipModel | None = None,
        square: bool = False,
        cache_dir: str | None = None,
        mask_prompt: str | None = None,
        region: str = "box",
    ) -> None:
        super().__init__()
        if region not in ("box", "image"):
            raise ValueError(f"region must be 'box' (OVSeg's crop) or 'image', got {region!r}")
        self.region = region
        if clip is None:
            if ovseg_ckpt:
                model_name, pretrained = quickgelu_name(model_name), None
            clip = ClipModel(model_name, pretrained, cache_dir=cache_dir)
        self.clip = clip
        visual = clip.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise NotImplementedError(
                f"the mask prompt needs an open_clip ViT tower; {clip.model_name} has "
                f"{type(visual).__name__}"
            )
        if visual.attn_pool is not None:
            raise NotImplementedError("ViTs with an attentional pooler are not supported")
        n_layers = len(visual.transformer.resblocks)
        if not 0 <= depth <= n_layers + 1:  # row d replaces after block d, the last included
            raise ValueError(
                f"depth must be in [0, {n_layers + 1}] for {clip.model_name}, got {depth}"
            )
        self.depth = int(depth)
        self.square = square
        self.grid: tuple[int, int] = tuple(visual.grid_size)
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)
        width = visual.conv1.out_channels
        g2 = self.grid[0] * self.grid[1]
        self.mask_embedding = nn.Parameter(torch.zeros(self.depth, g2, width))  # OVSeg: zeros
        if ovseg_ckpt and mask_prompt:
            raise ValueError("pass ovseg_ckpt (CLIP + mask prompt) or mask_prompt, not both")
        if ovseg_ckpt:
            self.load_ovseg(ovseg_ckpt)
        if mask_prompt:
            self.load_mask_prompt(mask_prompt)

    # ---------------------------------------------------------------- weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What mask-prompt tuning trains: `[mask_embedding]` (the CLIP stays frozen)."""
        return [self.mask_embedding]

    def mask_prompt_state(self, source: str | None = None) -> dict[str, Any]:
        """What `load_mask_prompt` reads: the prompt, its shape's meaning, and the CLIP's
        fingerprint and source (a prompt only fits the CLIP it was tuned with)."""
        return {
            "mask_embedding": self.mask_embedding.detach().cpu().clone(),
            "model_name": self.clip.model_name,
            "depth": self.depth,
            "clip_fingerprint": state_fingerprint(self.clip.model),
            "clip_source": source,
        }

    def load_mask_prompt(
        self, path: str | os.PathLike, accept_clip_mismatch: bool = False
    ) -> None:
        """Load a mask prompt written by mask-prompt tuning (`<run>/mask_prompt/mask_prompt.pt`).

        The file records the fingerprint of the CLIP it was tuned with; another CLIP is refused
        (the prompt is meaningless there) unless `accept_clip_mismatch`.
        """
        state = load_checkpoint(path)
        if "mask_embedding" not in state:
            raise CheckpointMismatchError(
                f"'{path}' holds no 'mask_embedding' (keys: {sorted(map(str, state))[:8]}); pass "
                "the mask_prompt.pt written by `train.py experiment=mask_prompt_*`, or an OVSeg "
                "checkpoint as ovseg_ckpt="
            )
        emb = state["mask_embedding"]
        if tuple(emb.shape) != tuple(self.mask_embedding.shape):
            raise CheckpointMismatchError(
                f"'{path}': mask_embedding is {tuple(emb.shape)} (depth, grid², width), tuned for "
                f"{state.get('model_name')} at depth {state.get('depth')}, but this "
                f"{self.clip.model_name} with depth={self.depth} needs "
                f"{tuple(self.mask_embedding.shape)}"
            )
        fp = state.get("clip_fingerprint")
        if fp and not accept_clip_mismatch and fp != state_fingerprint(self.clip.model):
            raise CheckpointMismatchError(
                f"the mask prompt '{path}' was tuned with the CLIP {state.get('clip_source')} "
                f"(fingerprint {fp}), which differs from this {self.clip.model_name}'s weights; "
                "pass the same CLIP weights as pretrained= (or accept_clip_mismatch=True)"
            )
        with torch.no_grad():
            self.mask_embedding.copy_(emb)
        log.info("mask prompt (depth %d) loaded from %s", self.depth, path)

    def load_ovseg(self, path: str | os.PathLike) -> None:
        """Load the CLIP and the mask prompt of an OVSeg checkpoint, strictly."""
        sd = read_ovseg_clip_state(path)
        emb = sd.pop("visual.mask_embedding", None)
        if emb is None:
            raise CheckpointMismatchError(
                f"checkpoint '{path}' has no '{OVSEG_CLIP_PREFIX}visual.mask_embedding': not a "
                "mask-prompt-tuned OVSeg checkpoint (the released ones end in _ft_mpt.pth)"
            )
        if tuple(emb.shape) != tuple(self.mask_embedding.shape):
            raise CheckpointMismatchError(
                f"checkpoint '{path}': visual.mask_embedding is {tuple(emb.shape)} (depth, grid², "
                f"width) but this {self.clip.model_name} with depth={self.depth} needs "
                f"{tuple(self.mask_embedding.shape)}; pass depth={emb.shape[0]} and the CLIP "
                "architecture the checkpoint was trained with"
            )
        load_state_dict_strict(
            self.clip.model,
            sd,
            source=f"{path} (keys under '{OVSEG_CLIP_PREFIX}')",
            expected=f"OpenAI-layout CLIP weights of open_clip {self.clip.model_name}",
        )
        with torch.no_grad():
            self.mask_embedding.copy_(emb)
        log.info(
            "OVSeg CLIP %s and mask prompt (depth %d) loaded from %s",
            self.clip.model_name, self.depth, path,
        )  # fmt: skip

    # ---------------------------------------------------------------- forward

    def patch_mask(self, crop_masks: Tensor) -> Tensor:
        """(K, h, w) crop masks at the CLIP input size -> (K, grid², 1) in {0, 1}."""
        return patch_foreground(crop_masks, self.patch_size)

    def encode_masked(self, crops: Tensor, crop_masks: Tensor, normalize: bool = True) -> Tensor:
        """Masked crops (K, 3, h, w) in [-1, 1] at the CLIP input size + their pixel masks
        (K, h, w) -> (K, D) global embeddings, all K in one forward (differentiable in
        `mask_embedding`)."""
        visual = self.clip.model.visual
        x = self.clip.preprocess(crops)  # (K, 3, h, w) CLIP-normalised
        K = x.shape[0]
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # (K, g², width)
        prompt = self.mask_embedding.to(x.dtype)  # (depth, g², width)
        m = self.patch_mask(crop_masks).to(x.dtype)  # (K, g², 1)
        if self.depth > 0:
            x = x * m + prompt[0] * (1 - m)
        cls = visual.class_embedding.to(x.dtype).expand(K, 1, -1)  # (K, 1, width)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (K, 1+g², w)
        x = visual.ln_pre(visual.patch_dropout(x))
        batch_first = getattr(visual.transformer, "batch_first", True)
        for d, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if d < self.depth:  # the class token is never replaced
                x = torch.cat([x[:, :1], x[:, 1:] * m + prompt[d] * (1 - m)], dim=1)
        if getattr(visual, "final_ln_after_pool", False):
            pooled = visual.ln_post(self._pool(visual, x))  # (K, width)
        else:
            pooled = self._pool(visual, visual.ln_post(x))
        if visual.proj is not None:
            pooled = pooled @ visual.proj  # (K, D)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @staticmethod
    def _pool(visual: nn.Module, x: Tensor) -> Tensor:
        return x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]

    def crops(self, image: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(3, H, W) in [-1, 1] + (K, H, W) bool -> crops, crop masks, valid (`masked_crops`)."""
        fill = 2 * self.clip.mean.flatten() - 1  # CLIP's mean colour in [-1, 1]
        return masked_crops(
            image, masks, self.clip.image_size, fill, square=self.square,
            full=self.region == "image",
        )  # fmt: skip

    def encode_entities(
        self, image: Tensor, masks: Tensor, mask_prompt: bool = True, normalize: bool = True
    ) -> Tensor:
        """One image (3, H, W) in [-1, 1] and K entity masks (K, H, W) -> (K, D) embeddings.

        All K crops go through the ViT in one forward; an empty mask gives a NaN row.
        `mask_prompt=False` encodes the same crops with the plain CLIP (no mask prompt).
        """
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        device = self.clip.mean.device
        crops, crop_masks, valid = self.crops(image.to(device), masks.to(device))
        if mask_prompt:
            emb = self.encode_masked(crops, crop_masks, normalize=normalize)  # (K, D)
        else:
            emb = self.clip.encode_image(crops, normalize=normalize)  # (K, D)
        return emb.masked_fill(~valid[:, None], float("nan"))
