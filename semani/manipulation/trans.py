"""SeMani-Trans image manipulation: re-sample the entity's VQGAN tokens under a target text.

Inference only. `TransEditor.edit` tokenises the text, encodes the image to VQGAN tokens (and,
with vision guidance, the grayscale image replicated to 3 channels), re-samples the tokens
inside the token mask with the transformer while every other token is forced to the original,
and decodes. `mask_to_token_mask` (`semani.utils.masks`, shared with the alignment phase) turns a
pixel mask into that token mask (bilinear resize to the token grid, then `> threshold`, as the
paper prefers to max-pooling).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from semani.data.transforms import to_grayscale
from semani.manipulation.sampling import sample_image_tokens
from semani.modules.gpt import SemaniGPT
from semani.utils.masks import MaskTooSmallError, mask_to_token_mask

log = logging.getLogger(__name__)

__all__ = ["MaskTooSmallError", "TransEditor", "mask_to_token_mask"]


class TokenCodec(Protocol):
    """What the editor needs from a VQGAN (`semani.models.vqgan.VQGANModule`)."""

    def encode_to_tokens(self, images: Tensor) -> Tensor: ...  # (B,3,H,W) -> (B,h,w) long

    def decode_tokens(self, tokens: Tensor) -> Tensor: ...  # (B,h,w) long -> (B,3,H,W)


class Tokenizer(Protocol):
    """What the editor needs from `semani.data.tokenizer.TextTokenizer`."""

    context_length: int

    def __call__(self, texts: str | Sequence[str]) -> Tensor: ...  # -> (B, L) long


class TransEditor:
    """Entity-level manipulation with SeMani-Trans (transformer + frozen VQGAN + tokenizer)."""

    def __init__(
        self,
        gpt: SemaniGPT,
        vqgan: TokenCodec,
        tokenizer: Tokenizer,
        filter_thres: float = 0.99,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> None:
        self.gpt = gpt
        self.vqgan = vqgan
        self.tokenizer = tokenizer
        self.filter_thres = filter_thres
        self.temperature = temperature
        self.use_cache = use_cache
        if tokenizer.context_length != gpt.config.text_len:
            raise ValueError(
                f"tokenizer context_length {tokenizer.context_length} != transformer text_len "
                f"{gpt.config.text_len}; build the tokenizer with context_length=text_len"
            )

    @property
    def device(self) -> torch.device:
        return self.gpt.image_head.weight.device

    def _inputs(
        self, image: Tensor, mask_tokens: Tensor, text: str | Sequence[str]
    ) -> tuple[Tensor, Tensor, list[str]]:
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        B = image.shape[0]
        if mask_tokens.dim() == 2:
            mask_tokens = mask_tokens[None]
        if mask_tokens.dim() != 3 or mask_tokens.dtype != torch.bool:
            raise ValueError(
                "mask_tokens must be a bool (h, w) or (B, h, w) token mask (see "
                f"mask_to_token_mask), got {tuple(mask_tokens.shape)} {mask_tokens.dtype}"
            )
        if mask_tokens.shape[0] not in (1, B):
            raise ValueError(f"mask_tokens batch {mask_tokens.shape[0]} != image batch {B}")
        texts = [text] * B if isinstance(text, str) else list(text)
        if len(texts) == 1:
            texts = texts * B
        if len(texts) != B:
            raise ValueError(f"got {len(texts)} texts for {B} images")
        return image, mask_tokens.expand(B, -1, -1), texts

    @torch.inference_mode()
    def edit_tokens(
        self,
        image: Tensor,
        mask_tokens: Tensor,
        text: str | Sequence[str],
        gray_guidance: bool = False,
        seed: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Like `edit` but returns (original tokens, edited tokens), both (B, h, w) long."""
        image, mask_tokens, texts = self._inputs(image, mask_tokens, text)
        device = self.device
        image = image.to(device)
        tokens = self.vqgan.encode_to_tokens(image).to(device)  # (B, h, w)
        B, h, w = tokens.shape
        if h * w != self.gpt.config.image_len:
            raise ValueError(
                f"VQGAN gives {h}x{w} tokens but the transformer expects image_len="
                f"{self.gpt.config.image_len}: resize the image"
            )
        if mask_tokens.shape[1:] != (h, w):
            raise ValueError(
                f"mask_tokens grid {tuple(mask_tokens.shape[1:])} != VQGAN's {(h, w)}"
            )
        text_tokens = self.tokenizer(texts).to(device)  # (B, Lt)
        gray = use_gray = None
        if gray_guidance:
            gray = self.vqgan.encode_to_tokens(to_grayscale(image)).to(device).flatten(1)
            use_gray = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        edited = sample_image_tokens(
            self.gpt,
            text_tokens,
            image=tokens.flatten(1),  # (B, h*w)
            token_mask=mask_tokens.to(device).flatten(1),  # (B, h*w)
            gray=gray,
            use_gray=use_gray,
            filter_thres=self.filter_thres,
            temperature=self.temperature,
            generator=generator,
            use_cache=self.use_cache,
        )
        log.debug("re-sampled %d of %d tokens", int(mask_tokens.sum()), tokens.numel())
        return tokens, edited.view(B, h, w)

    @torch.inference_mode()
    def edit(
        self,
        image: Tensor,
        mask_tokens: Tensor,
        text: str | Sequence[str],
        gray_guidance: bool = False,
        seed: int | None = None,
    ) -> Tensor:
        """Re-generate the masked tokens of `image` under `text`; decode with the VQGAN.

        Args:
            image: (3, H, W) or (B, 3, H, W) in [-1, 1].
            mask_tokens: (h, w) or (B, h, w) bool token mask, True = re-sample.
            text: one target text for all images or one per image.
            gray_guidance: condition on the grayscale image's tokens (vision guidance).
            seed: seed of the sampling generator (None: torch's global generator).
        Returns:
            The edited image(s), same batch shape as `image`.
        """
        _, edited = self.edit_tokens(image, mask_tokens, text, gray_guidance, seed)
        out = self.vqgan.decode_tokens(edited)  # (B, 3, H, W)
        return out[0] if image.dim() == 3 else out

    __call__ = edit
