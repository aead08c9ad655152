"""SeMani-Trans image manipulation: re-sample the entity's VQGAN tokens under a target text.

Inference only, two levels:

- `TransTokenEditor.edit(image, token_mask, text)` works at the model's own size: it tokenises
  the text, encodes the image to VQGAN tokens (and, with vision guidance, the grayscale image
  replicated to 3 channels), re-samples the tokens inside the token mask with the transformer
  while every other token is forced to the original, and decodes.
- `TransEditor.edit(image, mask, text)` is the image-level editor of the editor contract
  (`semani.manipulation.editor`): any size, a pixel mask, the input kept outside the mask. It
  resizes to the model's size, turns the pixel mask into the token mask with
  `mask_to_token_mask` (`semani.utils.masks`, shared with the alignment phase: bilinear resize
  to the token grid, then `> 0`, as the paper prefers to max-pooling), calls the token editor,
  resizes back and composites (`semani.manipulation.pixels`); with `region="entity"` it does so
  on a context window around the mask (the union of the masks for `edit_many`), pasted back at
  the input's resolution (`semani.manipulation.region`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import to_grayscale
from semani.manipulation.pixels import (
    as_mask,
    as_source,
    composite,
    feather_weights,
    prepare_inputs,
    resize_bilinear,
)
from semani.manipulation.region import check_region, edit_in_region
from semani.manipulation.sampling import sample_image_tokens
from semani.modules.gpt import SemaniGPT
from semani.utils.checkpoint import CheckpointMismatchError
from semani.utils.masks import MaskTooSmallError, mask_to_token_mask

log = logging.getLogger(__name__)

__all__ = ["MaskTooSmallError", "TransEditor", "TransTokenEditor", "mask_to_token_mask"]


class TokenCodec(Protocol):
    """What the editor needs from a VQGAN (`semani.models.vqgan.VQGANModule`)."""

    def encode_to_tokens(self, images: Tensor) -> Tensor: ...  # (B,3,H,W) -> (B,h,w) long

    def decode_tokens(self, tokens: Tensor) -> Tensor: ...  # (B,h,w) long -> (B,3,H,W)


class Tokenizer(Protocol):
    """What the editor needs from `semani.data.tokenizer.TextTokenizer`."""

    context_length: int

    def __call__(self, texts: str | Sequence[str]) -> Tensor: ...  # -> (B, L) long


class TransTokenEditor:
    """Entity-level manipulation with SeMani-Trans on its token grid (transformer + frozen
    VQGAN + tokenizer), at the model's own image size."""

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
        limit = self.tokenizer.context_length - 2  # SOT and EOT
        for t in dict.fromkeys(texts):
            ids = self.tokenizer.encode(t) if hasattr(self.tokenizer, "encode") else []
            if len(ids) > limit:
                log.warning("the text has %d tokens, the transformer reads %d: %r is dropped",
                            len(ids), limit, self.tokenizer.decode(ids[limit:]))  # fmt: skip
        return image, mask_tokens.expand(B, -1, -1), texts

    @torch.inference_mode()
    def edit_tokens(
        self,
        image: Tensor,
        mask_tokens: Tensor,
        text: str | Sequence[str],
        gray_guidance: bool = False,
        seed: int | None = None,
        tokens: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Like `edit` but returns (original tokens, edited tokens), both (B, h, w) long.

        `tokens` (B, h, w): re-sample these instead of `image`'s own tokens (a chain of edits
        on the running tokens, as the authors edit several entities); the grayscale guidance
        still comes from `image`.
        """
        image, mask_tokens, texts = self._inputs(image, mask_tokens, text)
        device = self.device
        image = image.to(device)
        if tokens is None:
            tokens = self.vqgan.encode_to_tokens(image)  # (B, h, w)
        tokens = tokens.to(device)
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


class TransEditor:
    """SeMani-Trans as an image-level editor: any size, a pixel mask, the input kept outside it.

    The image is resized (bilinear, antialiased) to the model's training size, the pixel mask
    becomes a token mask on the VQGAN grid (`mask_to_token_mask`: bilinear, > 0), the tokens
    inside it are re-sampled (`TransTokenEditor`), the decoded image is resized back and
    composited into the input with `feather_weights(mask, feather)`: every pixel outside the
    mask is the input's.

    Args:
        model: a `SemaniTransModule` (`gpt`, `vqgan`), e.g. from `semani.load_model`.
        filter_thres, temperature: top-k sampling (see `TransTokenEditor`).
        gray_guidance: condition on the grayscale image's tokens (keeps the entity's shape).
        image_size: the model's input (H, W) or side; None: sqrt(image_len) tokens per side
            times the VQGAN's downsampling factor.
        feather: seam width in pixels inside the mask, at the input size.
        min_tokens: refuse (`MaskTooSmallError`) masks covering fewer token cells.
        device: where the model runs (None: where it is).
        composite: paste the result into the input (every pixel outside the mask the input's);
            False returns the decoded image itself, resized back.
        region: "image" resizes the whole image to `image_size`; "entity" a window around the
            mask (its box grown by `context` times its longer side on every side, square where
            the image allows), pasted back (`semani.manipulation.region`).
        context: the window's margin for ``region="entity"``, a fraction of the box's side.
    """

    def __init__(
        self,
        model: Any,
        filter_thres: float = 0.99,
        temperature: float = 1.0,
        gray_guidance: bool = True,
        image_size: int | Sequence[int] | None = None,
        feather: float = 4,
        min_tokens: int = 1,
        device: str | torch.device | None = None,
        composite: bool = True,
        region: str = "image",
        context: float = 0.5,
    ) -> None:
        self.region, self.context = check_region(region, context)
        if device is not None:
            model = model.to(device)
        gpt, vqgan = model.gpt, model.vqgan
        factor = int(vqgan.downsample_factor)
        image_len = int(gpt.config.image_len)
        if image_size is None:
            side = math.isqrt(image_len)
            if side * side != image_len:
                raise ValueError(
                    f"image_len={image_len} is not a square grid: pass editor.image_size=[h, w]"
                )
            image_size = (side * factor, side * factor)
        elif isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.token_grid = (self.image_size[0] // factor, self.image_size[1] // factor)
        if self.token_grid[0] * self.token_grid[1] != image_len:
            raise ValueError(
                f"image_size {self.image_size} gives a {self.token_grid} token grid, but the "
                f"transformer expects image_len={image_len} tokens"
            )
        self.tokens = TransTokenEditor(
            gpt,
            vqgan,
            TextTokenizer(gpt.config.text_len),
            filter_thres=filter_thres,
            temperature=temperature,
        )
        self.gray_guidance, self.feather, self.min_tokens = gray_guidance, feather, min_tokens
        self.composite = composite

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | os.PathLike, device: str | torch.device | None = None, **kwargs: Any
    ) -> TransEditor:
        """An editor from a SeMani-Trans checkpoint (`semani.load_model`, eval mode)."""
        from semani.loading import load_model

        if ckpt is None:
            raise ValueError(
                "missing required editor.ckpt: pass editor.ckpt=<a SeMani-Trans checkpoint "
                "written by train.py, e.g. logs/<task>/runs/<run>/checkpoints/last.ckpt>"
            )
        model = load_model(ckpt, device=device)
        if not (hasattr(model, "gpt") and hasattr(model, "vqgan")):
            raise CheckpointMismatchError(
                f"'{ckpt}' holds a {type(model).__name__}, not a SeMani-Trans model"
            )
        log.info("SeMani-Trans editor from %s", ckpt)
        return cls(model, device=device, **kwargs)

    def edit(self, image: Any, mask: Any, text: str, seed: int | None = None) -> list[Any]:
        """Re-sample the masked entity of `image` after `text`; inputs and output as
        `DiffEditor.edit` (one image)."""
        return edit_in_region(
            self.region,
            self.context,
            image,
            [mask],
            lambda crop, masks: self._edit(crop, masks[0], text, seed),
        )

    def _edit(self, image: Any, mask: Any, text: str, seed: int | None) -> list[Any]:
        """`edit` on the whole of `image`."""
        src, pixel_mask, pixels, _ = prepare_inputs(image, mask, factor=1)  # (1,1,H,W), (1,3,H,W)
        H, W = src.original.shape[-2:]
        x = resize_bilinear(pixels, self.image_size).clamp(-1, 1)  # (1, 3, h, w)
        token_mask = mask_to_token_mask(
            pixel_mask[0, 0], self.token_grid, min_tokens=self.min_tokens
        )  # (gh, gw) bool
        out = self.tokens.edit(x[0], token_mask, text, self.gray_guidance, seed)  # (3, h, w)
        return self._paste(src, out, pixel_mask[0, 0])

    def edit_many(
        self, image: Any, masks: Sequence[Any], texts: Sequence[str], seed: int | None = None
    ) -> list[Any]:
        """Several entities of one image, as the authors edit them: each mask's tokens are
        re-sampled after its text on the *running tokens* (the previous edits' tokens, not a
        re-encoding of their decoded image), decoded once and pasted into the input inside the
        union of the masks (with ``region="entity"``: in a window around that union). Inputs and
        output as `edit`."""
        if len(masks) != len(texts) or not masks:
            raise ValueError(f"{len(masks)} masks for {len(texts)} texts")
        return edit_in_region(
            self.region,
            self.context,
            image,
            masks,
            lambda crop, crop_masks: self._edit_many(crop, crop_masks, texts, seed),
        )

    def _edit_many(
        self, image: Any, masks: Sequence[Any], texts: Sequence[str], seed: int | None
    ) -> list[Any]:
        """`edit_many` on the whole of `image`."""
        src = as_source(image)
        H, W = src.original.shape[-2:]
        x = resize_bilinear(src.pixels, self.image_size).clamp(-1, 1)[0]  # (3, h, w)
        union = torch.zeros(H, W)
        tokens = None
        for mask, text in zip(masks, texts):
            pixel_mask = as_mask(mask, (H, W))[0, 0]  # (H, W) in [0, 1]
            token_mask = mask_to_token_mask(
                pixel_mask, self.token_grid, min_tokens=self.min_tokens
            )
            _, tokens = self.tokens.edit_tokens(
                x, token_mask, text, self.gray_guidance, seed, tokens=tokens
            )  # (1, gh, gw)
            union = torch.maximum(union, pixel_mask)
        with torch.inference_mode():
            out = self.tokens.vqgan.decode_tokens(tokens)[0]  # (3, h, w)
        return self._paste(src, out, union)

    def _paste(self, src: Any, out: Tensor, pixel_mask: Tensor) -> list[Any]:
        """The decoded (3, h, w) image in [-1, 1] resized to the input and composited."""
        H, W = src.original.shape[-2:]
        out = ((out.float().cpu() + 1) / 2).clamp(0, 1)[None]  # (1, 3, h, w) in [0, 1]
        edited = resize_bilinear(out, (H, W)).clamp(0, 1)  # (1, 3, H, W)
        if not self.composite:
            return composite(src, edited, torch.ones(H, W))
        return composite(src, edited, feather_weights(pixel_mask, self.feather))

    __call__ = edit
