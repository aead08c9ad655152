"""FILIP's token-wise late-interaction similarity and contrastive loss (Yao et al. 2021).

With L2-normalised patch features `x` (B_I, N, D) and token features `y` (B_T, L, D), and
`sim[i, j, n, l] = <x_i,n, y_j,l>` (padding tokens excluded everywhere):

- image -> text: `s_i2t[i, j] = mean_n max_l sim[i, j, n, l]` (each patch finds its token);
- text -> image: `s_t2i[i, j] = mean_l max_n sim[i, j, n, l]` (each token finds its patch).

The loss is InfoNCE in both directions with CLIP's learnable temperature `logit_scale`
(`exp(logit_scale)` as open_clip passes it): `(CE(scale * s_i2t, diag) + CE(scale *
s_t2i^T, diag)) / 2`, the rows of `s_i2t` scoring texts per image and the rows of `s_t2i^T`
images per text. Negatives are the batch's (this process's, under DDP).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FilipLoss", "filip_similarity"]


def filip_similarity(
    patches: Tensor, tokens: Tensor, token_mask: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Token-wise similarities of every image with every text.

    Args:
        patches: (B_I, N, D) image patch features, L2-normalised.
        tokens: (B_T, L, D) text token features, L2-normalised.
        token_mask: (B_T, L) bool, True for the tokens that count (not padding); every row needs
            at least one True.
        chunk_size: texts per chunk (bounds memory at B_I * chunk * N * L floats); None: all.

    Returns:
        (s_i2t, s_t2i), both (B_I, B_T) indexed [image, text]: image->text (mean over patches of
        the max over the text's tokens) and text->image (mean over the text's tokens of the max
        over patches).
    """
    if token_mask.dtype != torch.bool or token_mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"token_mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got "
            f"{token_mask.dtype} {tuple(token_mask.shape)}"
        )
    if not bool(token_mask.any(dim=1).all()):
        raise ValueError("every text needs at least one unmasked token")
    chunk = chunk_size or tokens.shape[0]
    i2t, t2i = [], []
    for start in range(0, tokens.shape[0], chunk):
        y = tokens[start : start + chunk]  # (b, L, D)
        m = token_mask[start : start + chunk]  # (b, L)
        sim = torch.einsum("ind,jld->ijnl", patches, y)  # (B_I, b, N, L)
        valid = m[None, :, None, :]  # (1, b, 1, L)
        best_token = sim.masked_fill(~valid, float("-inf")).amax(dim=3)  # (B_I, b, N)
        i2t.append(best_token.mean(dim=2))  # (B_I, b)
        best_patch = sim.amax(dim=2)  # (B_I, b, L)
        w = m.to(sim.dtype)  # (b, L)
        t2i.append((best_patch * w).sum(dim=2) / w.sum(dim=1))  # (B_I, b)
    return torch.cat(i2t, dim=1), torch.cat(t2i, dim=1)


class FilipLoss(nn.Module):
    """FILIP's symmetric InfoNCE on token-wise similarities (see the module docstring)."""

    def forward(
        self, patches: Tensor, tokens: Tensor, token_mask: Tensor, logit_scale: Tensor
    ) -> Tensor:
        """Paired batches: patches (B, N, D) and tokens (B, L, D), both L2-normalised,
        token_mask (B, L) bool, logit_scale = exp(CLIP's log-scale) -> scalar loss."""
        if patches.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"FILIP needs paired batches: {patches.shape[0]} images, {tokens.shape[0]} texts"
            )
        s_i2t, s_t2i = filip_similarity(patches, tokens, token_mask)  # (B, B) each
        labels = torch.arange(patches.shape[0], device=patches.device)
        loss_i2t = F.cross_entropy(logit_scale * s_i2t, labels)  # rows: images
        loss_t2i = F.cross_entropy(logit_scale * s_t2i.T, labels)  # rows: texts
        return (loss_i2t + loss_t2i) / 2
