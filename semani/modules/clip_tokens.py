"""Per-patch and per-token CLIP features in the joint embedding space (FILIP-style).

FILIP (Yao et al. 2021) and SeMani's token-wise alignment compare image *patches* with text
*tokens* instead of one pooled embedding per side. For an open_clip `CLIP` (or `CustomTextCLIP`
with open_clip's own `TextTransformer`) whose image tower is a `VisionTransformer`:

- `patch_features(model, images)` -> (B, N, D): the patch tokens after the ViT's final norm
  (`ln_post`) and projection (`proj`), class token dropped; N = (H / patch) * (W / patch) in
  row-major order (token n is at grid row n // w, column n % w).
- `token_features(model, tokens)` -> (B, L, D): every text position after `ln_final` and
  `text_projection`; padding is NOT removed here (positions differ per caption): pass
  `text_token_mask(tokens)` to whatever consumes them.

`images` are the model's inputs (already resized and normalised with the CLIP mean/std, e.g.
`ClipModel.preprocess(x)`), `tokens` CLIP BPE ids (B, context_length). Both run open_clip's own
`forward_intermediates` (the last block's output, final norm applied), so they follow the tower's
config (pre-norm, pooling type, ...) instead of re-implementing its forward. The `*_with_*`
variants return the pooled embedding of the same pass too: `pooled == model.encode_image(images)`
and `model.encode_text(tokens)`. Nothing is L2-normalised unless `normalize=True`.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor

from semani.utils.text_tokens import EOT_TOKEN, text_padding_mask

__all__ = [
    "encode_image_with_patches",
    "encode_text_with_tokens",
    "patch_features",
    "text_token_mask",
    "token_features",
]


def _vision_tower(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(
            f"patch features need an open_clip VisionTransformer image tower; this model has "
            f"{type(visual).__name__}"
        )
    if visual.attn_pool is not None:
        raise NotImplementedError(
            "patch features of a ViT with an attentional pooler (CoCa) are not in the joint space"
        )
    return visual


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding `ln_final` / `text_projection`: the CLIP itself or `model.text`."""
    tower = getattr(model, "text", model)
    if not (hasattr(tower, "ln_final") and hasattr(tower, "text_projection")):
        raise NotImplementedError(
            f"token features need open_clip's standard text transformer; this model's text "
            f"tower is {type(tower).__name__}"
        )
    return tower


def _project(x: Tensor, proj: nn.Module | Tensor | None) -> Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_image_with_patches(
    model: nn.Module, images: Tensor, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """CLIP inputs (B, 3, H, W) -> (pooled (B, D), patches (B, N, D)), one forward pass."""
    visual = _vision_tower(model)
    out = visual.forward_intermediates(
        images, indices=1, normalize_intermediates=True, output_fmt="NLC"
    )
    pooled = out["image_features"]  # (B, D): what model.encode_image returns
    patches = _project(out["image_intermediates"][-1], visual.proj)  # (B, N, D), no class token
    if normalize:
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)
    return pooled, patches


def encode_text_with_tokens(
    model: nn.Module, tokens: Tensor, normalize: bool = False
) -> tuple[Tensor, Tensor]:
    """CLIP BPE ids (B, L) -> (pooled (B, D), per-token features (B, L, D)), one pass."""
    tower = _text_tower(model)
    out = model.forward_intermediates(
        text=tokens, text_indices=1, normalize_intermediates=True, normalize=False
    )
    pooled = out["text_features"]  # (B, D): what model.encode_text returns
    feats = _project(out["text_intermediates"][-1], tower.text_projection)  # (B, L, D)
    if normalize:
        return F.normalize(pooled, dim=-1), F.normalize(feats, dim=-1)
    return pooled, feats


def patch_features(model: nn.Module, images: Tensor, normalize: bool = False) -> Tensor:
    """CLIP inputs (B, 3, H, W) -> patch features (B, N, D) in the joint space.

    After the ViT's final norm and projection, class token dropped, row-major patch grid.
    """
    return encode_image_with_patches(model, images, normalize)[1]


def token_features(model: nn.Module, tokens: Tensor, normalize: bool = False) -> Tensor:
    """CLIP BPE ids (B, L) -> per-position text features (B, L, D) in the joint space.

    After `ln_final` and `text_projection`; padding positions are included (mask them with
    `text_token_mask(tokens)`). With a causal text tower, position l has seen tokens 0..l only.
    """
    return encode_text_with_tokens(model, tokens, normalize)[1]


def text_token_mask(tokens: Tensor, eot_token: int = EOT_TOKEN) -> Tensor:
    """(B, L) CLIP BPE ids -> (B, L) bool, True for SOT ... EOT (the non-padding positions)."""
    return ~text_padding_mask(tokens, eot_token)
