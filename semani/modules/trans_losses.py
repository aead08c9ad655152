"""SeMani-Trans training losses (SPEC Eq. 5-10).

- Eq. 5, two variants (`SemaniTransLoss(text_loss=...)`):
  - `text_loss` ("non_padding", ours): cross-entropy of the text tokens, mean over the positions
    before and at the EOT; the padding is not predicted.
  - `text_loss_all_positions` ("all_positions", the authors'): as lucidrains' DALLE-pytorch that
    their code builds on (`dalle_pytorch.py`: `text_range` gives pad position i the id
    `num_text_tokens + i`, and `loss_text = F.cross_entropy(text_logits, text)` averages over all
    128 positions), every pad position i is a class of its own, `text_vocab_size + i`, and the
    mean runs over ALL text positions. The text head then needs `text_len` extra outputs
    (`GPTConfig.text_pad_targets`). Each real token then weighs 1/Lt instead of 1 / (number of
    real tokens), e.g. ~6x less for a 20-token caption in 128 positions, and the easy pad
    positions pull the mean down. The authors' lambda_txt = 1 (against lambda_img = 7) goes with
    this loss, so it is the default of the paper configs.
- `image_loss` (Eq. 6): cross-entropy of the image tokens, mean over all positions.
- `gray_loss` (Eq. 8): cross-entropy of the grayscale (vision-guidance) tokens, mean over the
  positions of the samples that carry them; 0 when no sample does.
- `autoregressive_loss` (Eq. 9):
  `(l_txt L_txt + l_vg L_vg + l_img L_img) / (l_txt + l_vg + l_img)`.
  The denominator is the same whether or not the batch carries gray tokens, as in the authors'
  code (`DALLE_CONTEXT.forward`: `loss_vc = 0` and the weights still sum to 1 + 1 + 7), so
  the image and text terms keep one scale across batches and fine-tuning steps.
- `clip_semantic_loss` (Eq. 7): `1 - cos(CLIP_img(G(s_hat)), CLIP_txt(T))` where `s_hat` is a
  hard Gumbel-softmax one-hot over the image logits (straight-through: one-hot forward, softmax
  gradient), multiplied into the frozen VQGAN codebook and decoded by its frozen decoder.

All logits follow `SemaniGPT`'s convention: `logits[:, i]` predicts token `i`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TEXT_LOSSES",
    "token_cross_entropy",
    "text_loss",
    "text_pad_targets",
    "text_loss_all_positions",
    "image_loss",
    "gray_loss",
    "autoregressive_loss",
    "straight_through_onehot",
    "clip_semantic_loss",
    "TransLossWeights",
    "SemaniTransLoss",
]


# `SemaniTransLoss(text_loss=...)` choices: ours, and the authors' (DALL-E) loss
TEXT_LOSSES = ("non_padding", "all_positions")


class _Decoder(Protocol):  # what the semantic loss needs from the frozen VQGAN
    def embed_onehot(self, onehot: Tensor) -> Tensor: ...
    def decode(self, z_q: Tensor) -> Tensor: ...


class _Scorer(Protocol):  # what the semantic loss needs from the frozen CLIP
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor: ...
    def encode_text(self, text: Sequence[str] | Tensor, normalize: bool = True) -> Tensor: ...


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, L, V) logits, (B, L) targets -> (B, L) cross-entropy in float32."""
    # (B*L, V) rows: cross_entropy over a (B, V, L) transpose runs CUDA's "spatial" softmax
    # kernel, ~25x slower at V = 49408 (the text head dominated the paper-size step on an H100)
    B, L, V = logits.shape
    rows = logits.float().reshape(B * L, V)  # (B*L, V)
    return F.cross_entropy(rows, targets.reshape(B * L), reduction="none").view(B, L)


def text_loss(text_logits: Tensor, text: Tensor, pad_mask: Tensor) -> Tensor:
    """Eq. 5: mean CE over the text positions that are not padding.

    text_logits (B, Lt, Vt), text (B, Lt) long, pad_mask (B, Lt) bool (True = padding).
    """
    keep = (~pad_mask).float()  # (B, Lt)
    ce = token_cross_entropy(text_logits, text)  # (B, Lt)
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


def text_pad_targets(text: Tensor, pad_mask: Tensor, text_vocab_size: int) -> Tensor:
    """The authors' text targets: text (B, Lt) with pad position i replaced by
    `text_vocab_size + i` (their `text_range`). pad_mask (B, Lt) bool, True = padding."""
    pad_ids = torch.arange(text.shape[1], device=text.device) + text_vocab_size  # (Lt,)
    return torch.where(pad_mask, pad_ids, text)  # (B, Lt)


def text_loss_all_positions(
    text_logits: Tensor, text: Tensor, pad_mask: Tensor, text_vocab_size: int | None = None
) -> Tensor:
    """Eq. 5 as the authors' code: mean CE over ALL text positions, pad i targeting V + i.

    text_logits (B, Lt, V + Lt) from a text head with pad classes, text (B, Lt) long, pad_mask
    (B, Lt) bool (True = padding). `text_vocab_size` V defaults to `text_logits.shape[-1] - Lt`
    (the text length must then be the transformer's `text_len`).
    """
    Lt, classes = text.shape[1], text_logits.shape[-1]
    V = classes - Lt if text_vocab_size is None else text_vocab_size
    if V <= 0 or V + Lt != classes:
        raise ValueError(
            f"text_loss='all_positions' needs text logits with text_vocab_size + text_len = "
            f"{V} + {Lt} classes, got {classes}: set gpt.text_pad_targets=true"
        )
    return token_cross_entropy(text_logits, text_pad_targets(text, pad_mask, V)).mean()


def image_loss(image_logits: Tensor, image: Tensor) -> Tensor:
    """Eq. 6: mean CE over all image positions. image_logits (B, Li, Vi), image (B, Li)."""
    return token_cross_entropy(image_logits, image).mean()


def gray_loss(gray_logits: Tensor | None, gray: Tensor | None, use_gray: Tensor | None) -> Tensor:
    """Eq. 8: mean CE over the gray positions of the samples with `use_gray` True.

    gray_logits (B, Lg, Vi) | None, gray (B, Lg) | None, use_gray (B,) bool | None (None = all
    samples that have gray tokens). Returns a zero scalar when no sample carries gray tokens
    (still attached to the graph when logits exist, so DDP sees every parameter used).
    """
    if gray_logits is None or gray is None:
        return torch.zeros((), device=gray.device if gray is not None else None)
    if use_gray is None:
        use_gray = torch.ones(gray.shape[0], dtype=torch.bool, device=gray.device)
    w = use_gray.float()[:, None].expand_as(gray)  # (B, Lg)
    ce = token_cross_entropy(gray_logits, gray)  # (B, Lg)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def autoregressive_loss(
    l_txt: Tensor,
    l_img: Tensor,
    l_vg: Tensor,
    lambda_txt: float = 1.0,
    lambda_img: float = 7.0,
    lambda_vg: float = 1.0,
) -> Tensor:
    """Eq. 9: `(λ_txt L_txt + λ_vg L_vg + λ_img L_img) / (λ_txt + λ_vg + λ_img)`."""
    total = lambda_txt + lambda_vg + lambda_img
    if total <= 0:
        raise ValueError(f"the loss weights must have a positive sum, got {total}")
    return (lambda_txt * l_txt + lambda_vg * l_vg + lambda_img * l_img) / total


def straight_through_onehot(
    logits: Tensor, tau: float = 1.0, noise: bool = True, dim: int = -1
) -> Tensor:
    """Hard one-hot forward, softmax(logits / tau) gradient backward.

    With `noise` (training) this is `F.gumbel_softmax(logits, tau, hard=True)`: a sample from
    the categorical distribution; without it the argmax one-hot (deterministic, for validation).
    """
    if tau <= 0:
        raise ValueError(f"gumbel tau must be > 0, got {tau}")
    if noise:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=dim)
    soft = F.softmax(logits / tau, dim=dim)
    hard = F.one_hot(soft.argmax(dim), soft.shape[dim]).movedim(-1, dim).to(soft.dtype)
    return hard - soft.detach() + soft


def clip_semantic_loss(
    image_logits: Tensor,
    text: Sequence[str] | Tensor,
    vqgan: _Decoder,
    clip: _Scorer,
    grid: tuple[int, int],
    tau: float = 1.0,
    noise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Eq. 7: `1 - cos(CLIP_img(G(s_hat)), CLIP_txt(T))`, averaged over the batch.

    Args:
        image_logits: (B, Li, Vi) transformer image logits, Li = h * w.
        text: B captions (or (B, L) CLIP-BPE token ids) the images should match.
        vqgan: frozen VQGAN with `embed_onehot((B, h, w, Vi)) -> (B, C, h, w)` and `decode`.
        clip: frozen CLIP with `encode_image` ([-1, 1] input) and `encode_text`.
        grid: (h, w) of the image-token grid.
        tau: Gumbel-softmax temperature (only the backward pass sees it).
        noise: Gumbel noise (training); False uses the argmax one-hot.

    Returns:
        (loss scalar, decoded images (B, 3, H, W)); gradients reach `image_logits` only.
    """
    B, Li, V = image_logits.shape
    h, w = grid
    if h * w != Li:
        raise ValueError(f"token grid {h}x{w} does not hold the {Li} image logits")
    onehot = straight_through_onehot(image_logits.float(), tau=tau, noise=noise)  # (B, Li, V)
    z_q = vqgan.embed_onehot(onehot.view(B, h, w, V))  # (B, C, h, w)
    images = vqgan.decode(z_q)  # (B, 3, H, W)
    img_emb = clip.encode_image(images, normalize=True)  # (B, D)
    with torch.no_grad():
        txt_emb = clip.encode_text(text, normalize=True)  # (B, D)
    cos = (img_emb.float() * txt_emb.float()).sum(-1)  # (B,)
    return (1.0 - cos).mean(), images


@dataclass
class TransLossWeights:
    """Eq. 9-10 weights; defaults from the authors' SeMani-Trans code."""

    lambda_txt: float = 1.0
    lambda_img: float = 7.0
    lambda_vg: float = 1.0
    lambda_sem: float = 5.0


class SemaniTransLoss(nn.Module):
    """All SeMani-Trans loss terms from one transformer output (Eq. 5-10).

    `text_loss` picks Eq. 5: "non_padding" (ours: padding ignored) or "all_positions" (the
    authors': every position, pad i targets class `text_vocab_size + i`; needs a GPT built with
    `text_pad_targets=True`). `text_vocab_size`, when given, lets "all_positions" check the text
    logits' size exactly; without it a head lacking the pad classes is caught from the data.
    `forward` returns a dict with `loss_txt`, `loss_img`, `loss_vg`, `loss_ar` and, when
    `lambda_sem > 0` and a VQGAN + CLIP are passed, `loss_sem`; `loss` is
    `loss_ar + lambda_sem * loss_sem` (Eq. 10).
    """

    def __init__(
        self,
        lambda_txt: float = 1.0,
        lambda_img: float = 7.0,
        lambda_vg: float = 1.0,
        lambda_sem: float = 5.0,
        gumbel_tau: float = 1.0,
        text_loss: str = "non_padding",
        text_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if min(lambda_txt, lambda_img, lambda_vg, lambda_sem) < 0:
            raise ValueError("loss weights must be >= 0")
        if text_loss not in TEXT_LOSSES:
            raise ValueError(f"text_loss must be one of {TEXT_LOSSES}, got {text_loss!r}")
        self.w = TransLossWeights(lambda_txt, lambda_img, lambda_vg, lambda_sem)
        self.gumbel_tau = gumbel_tau
        self.text_loss = text_loss
        self.text_vocab_size = text_vocab_size

    def _text_loss(self, text_logits: Tensor, text: Tensor, pad_mask: Tensor) -> Tensor:
        """Eq. 5 in the configured variant (see the module docstring)."""
        if self.text_loss == "non_padding":
            return text_loss(text_logits, text, pad_mask)
        if self.text_vocab_size is None:
            # without the vocabulary size, a head that lacks the pad classes shows in the data:
            # every CLIP caption holds SOT/EOT, the last ids of the vocabulary, which would land
            # among the pad ids (one host sync per call)
            V = text_logits.shape[-1] - text.shape[1]
            if V <= 0 or bool((text.masked_fill(pad_mask, 0) >= V).any()):
                raise ValueError(
                    f"text_loss='all_positions' needs a text head with one pad class per text "
                    f"position (text_vocab_size + text_len outputs), but the text logits have "
                    f"{text_logits.shape[-1]} classes for {text.shape[1]} positions and the "
                    f"text holds ids >= {V}: set gpt.text_pad_targets=true, or "
                    f"text_loss='non_padding'"
                )
        return text_loss_all_positions(text_logits, text, pad_mask, self.text_vocab_size)

    def forward(
        self,
        text_logits: Tensor,
        image_logits: Tensor,
        gray_logits: Tensor | None,
        text: Tensor,
        image: Tensor,
        pad_mask: Tensor,
        gray: Tensor | None = None,
        use_gray: Tensor | None = None,
        sem_text: Sequence[str] | Tensor | None = None,
        vqgan: _Decoder | None = None,
        clip: _Scorer | None = None,
        grid: tuple[int, int] | None = None,
        sem_noise: bool = True,
        sem_max_samples: int | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms. image (B, Li) targets; `sem_*`/`vqgan`/`clip`/`grid` for Eq. 7.

        `sem_max_samples` limits Eq. 7 to the first N samples of the batch (memory: each one is
        decoded and encoded with gradients).
        """
        w = self.w
        out = {
            "loss_txt": self._text_loss(text_logits, text, pad_mask),
            "loss_img": image_loss(image_logits, image),
            "loss_vg": gray_loss(gray_logits, gray, use_gray).to(image_logits.device),
        }
        out["loss_ar"] = autoregressive_loss(
            out["loss_txt"],
            out["loss_img"],
            out["loss_vg"],
            w.lambda_txt,
            w.lambda_img,
            w.lambda_vg,
        )
        out["loss"] = out["loss_ar"]
        if w.lambda_sem > 0 and vqgan is not None and clip is not None:
            if sem_text is None or grid is None:
                raise ValueError("the semantic loss needs sem_text (captions) and the token grid")
            n = image_logits.shape[0] if sem_max_samples is None else sem_max_samples
            out["loss_sem"], _ = clip_semantic_loss(
                image_logits[:n], sem_text[:n], vqgan, clip, grid, self.gumbel_tau, sem_noise
            )
            out["loss"] = out["loss_ar"] + w.lambda_sem * out["loss_sem"]
        return out
