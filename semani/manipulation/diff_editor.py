"""SeMani-Diff image manipulation: re-paint an entity with a latent-diffusion inpainting model.

Inference only (SPEC "SeMani-Diff", Eq. 12-15). `DiffEditor.edit(image, mask, text)`:

1. the image (any size; PIL, uint8 or [-1, 1] float) and its mask (white / True / > 0.5 = edit)
   are resized to the model grid: each side rounded down to a multiple of the VAE factor (8),
   the mask binarised at 0.5;
2. the masked image `x * (M < 0.5)` is encoded with the VAE (a posterior sample), the mask is
   resized to the latent grid (nearest);
3. an explicit DDIM loop (any diffusers scheduler works) on the 9-channel UNet input
   [z_t, M, E((1-M)x)] with classifier-free guidance (Eq. 15; no unconditional batch when the
   guidance scale is <= 1); the noise and the VAE samples come from one `torch.Generator`, in
   the order of diffusers' `StableDiffusionInpaintPipeline`, which `generate` reproduces with
   `guidance_form="diffusers"`;
4. decode, resize back to the input size, and composite in pixel space with `feather_weights`:
   every pixel outside the mask is the input, bit for bit.

Guidance (`guidance_form`): "paper" (the default) is Eq. 15, ε(z_t, ∅) + s·(ε(z_t, c) − ε(z_t,
∅)) with ∅ the empty text *and* the empty mask condition (the all-ones mask and the latent of
the all-gray masked image, drawn from the generator after the masked image's), what training
with `joint_dropout` teaches; "diffusers" empties the text only and keeps the real mask and
masked image in the unconditional branch (diffusers' pipeline).

`region="entity"` runs the four steps on a context window around the mask instead of the whole
image and pastes it back (`semani.manipulation.region`). `generate` returns the decoded images
before step 4. The pixel side (input forms, model grid, composite) is
`semani.manipulation.pixels`; `LatentEditor` and the loop's helpers are shared with
`semani.manipulation.blended`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from semani.manipulation.pixels import (
    composite,
    feather_weights,
    model_size,
    prepare_inputs,
    resize_bilinear,
)
from semani.manipulation.region import check_region, edit_in_region
from semani.modules.diffusion_parts import (
    decode_latents,
    encode_text,
    latent_mask,
    load_sd_components,
    sample_latents,
    vae_scale_factor,
)
from semani.utils.image_cache import ImageCache, fingerprint

log = logging.getLogger(__name__)

__all__ = ["DiffEditor", "LatentEditor"]

StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, timestep, latents)
GUIDANCE_FORMS = ("paper", "diffusers")


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for `seed` (the same noise on every device), or the given one."""
    if generator is not None and seed is not None:
        raise ValueError("pass seed or generator, not both")
    return torch.Generator().manual_seed(seed) if seed is not None else generator


def step_kwargs(scheduler, eta: float, generator: torch.Generator | None) -> dict[str, Any]:
    """`eta` and `generator` for `scheduler.step`, where its signature takes them."""
    params = set(inspect.signature(scheduler.step).parameters)
    out: dict[str, Any] = {}
    if "eta" in params:
        out["eta"] = eta
    if "generator" in params:
        out["generator"] = generator
    return out


def text_embeddings(
    text_encoder, tokenizer, text: str, negative_text: str, num_images: int, cfg: bool
) -> Tensor:
    """(N, L, D) text states, or (2N, L, D) [unconditional; conditional] with guidance. A text
    longer than the tokenizer's length is cut there, with a warning naming what is dropped."""
    warn_if_truncated(tokenizer, text)
    cond = encode_text(text_encoder, tokenizer, [text]).repeat(num_images, 1, 1)  # (N, L, D)
    if not cfg:
        return cond
    uncond = encode_text(text_encoder, tokenizer, [negative_text]).repeat(num_images, 1, 1)
    return torch.cat([uncond, cond])  # (2N, L, D)


def warn_if_truncated(tokenizer, text: str) -> None:
    """Warn when `text` has more tokens than the text encoder reads (SD's CLIP: 77 with
    start and end), naming the words that are dropped."""
    ids = tokenizer(text, truncation=False).input_ids
    limit = int(tokenizer.model_max_length)
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1 : -1])
        log.warning("the text has %d tokens, the text encoder reads %d: %r is dropped",
                    len(ids), limit, dropped)  # fmt: skip


def guided_noise(unet, x: Tensor, t: Tensor, embeds: Tensor, scale: float, cfg: bool) -> Tensor:
    """The UNet's noise prediction with classifier-free guidance (Eq. 15) when `cfg`.

    `x` is the scaled model input, already doubled ([uncond; cond]) under guidance.
    """
    eps = unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
    if not cfg:
        return eps
    eps_uncond, eps_text = eps.chunk(2)
    return eps_uncond + scale * (eps_text - eps_uncond)


def fresh_scheduler(scheduler):
    """A new scheduler of the same class and config (schedulers carry per-run state)."""
    return type(scheduler).from_config(scheduler.config)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or its name ("float16", "bfloat16"; for configs)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; e.g. 'float32', 'float16', 'bfloat16'")
    return value


def pretrained_parts(
    source: str | os.PathLike,
    inpaint: bool,
    scheduler: str | None,
    config: str | os.PathLike | None,
    torch_dtype: torch.dtype | str | None,
) -> dict[str, Any]:
    """`load_sd_components`, with the scheduler replaced by the diffusers class `scheduler`
    (built from the source's scheduler config) unless it is None."""
    torch_dtype = as_dtype(torch_dtype)
    parts = load_sd_components(
        source, inpaint=inpaint, config=config, torch_dtype=torch_dtype, what="editor.source"
    )
    if scheduler is not None:
        import diffusers

        parts["scheduler"] = getattr(diffusers, scheduler).from_config(parts["scheduler"].config)
    return parts


def prepare_components(
    modules: Sequence[torch.nn.Module],
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
) -> None:
    """Freeze (`eval`, no gradients) and move the models to `device` / `dtype`."""
    dtype = as_dtype(dtype)
    for m in modules:
        m.eval().requires_grad_(False)
        if device is not None or dtype is not None:  # dtype only when given: diffusers warns
            m.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})


def inpaint_condition(
    encode: Callable[[Tensor, torch.Generator | None], Tensor],
    pixels: Tensor,
    mask: Tensor,
    generator: torch.Generator | None,
    dtype: torch.dtype,
) -> Tensor:
    """What an inpainting UNet reads beside the noisy latents, for a model-grid image
    (1, 3, H, W) in [-1, 1] and mask (1, 1, H, W): (1, 1 + C, H/f, W/f), the mask on the latent
    grid and E((1 - M) x), a posterior sample drawn from `generator` (diffusers' order) by
    `encode` (`LatentEditor.encode`)."""
    masked = pixels * (mask.to(pixels.device) < 0.5)  # (1, 3, H, W)
    masked_latents = encode(masked, generator).to(dtype)  # (1, C, h, w)
    m = latent_mask(mask.to(masked_latents.device), tuple(masked_latents.shape[-2:]))
    return torch.cat([m.to(dtype), masked_latents], 1)  # (1, 1 + C, h, w)


# ---------------------------------------------------------------------------------------------
# the editor


class LatentEditor:
    """What `DiffEditor` and `BlendedLatentEditor` share: the Stable-Diffusion parts moved to
    their device and dtype, `from_pretrained`, and decoding. Subclasses set `inpaint` (the kind
    of diffusers folder `from_pretrained` reads) and check their UNet."""

    inpaint: bool = True
    # the editor contract (semani.manipulation.editor): no token grid, any non-empty mask
    token_grid: tuple[int, int] | None = None
    min_tokens: int = 1

    def _set_parts(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        device,
        dtype,
        vae_tiling: bool,
        latent_cache: int,
    ) -> None:
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        prepare_components([unet, vae, text_encoder], device, dtype)
        if vae_tiling:
            vae.enable_tiling()
        self.factor = vae_scale_factor(vae)
        self.latent_cache = ImageCache(latent_cache) if latent_cache else None

    def posterior(self, pixels: Tensor) -> Any:
        """The VAE's posterior (diffusers' `DiagonalGaussianDistribution`) of model-grid pixels
        (B, 3, H, W) in [-1, 1]. With `latent_cache`, those of the last N distinct inputs are
        kept, keyed by their exact bytes: a second edit of a photo skips the encoder for the
        image itself (`strength` < 1), the masked image under the same mask (a new text or seed)
        and Eq. 15's empty condition (the all-gray image)."""
        x = pixels.to(device=self.device, dtype=self.vae.dtype)
        if self.latent_cache is None:
            return self.vae.encode(x).latent_dist
        return self.latent_cache.get(
            fingerprint(x), "posterior", lambda: self.vae.encode(x).latent_dist
        )

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of model-grid pixels: a posterior sample drawn from `generator`
        (`sample_latents`; the same tensor whether the posterior was cached or not)."""
        return sample_latents(self.vae, self.posterior(pixels), generator)

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        scheduler: str | None = "DDIMScheduler",
        config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ):
        """An editor from a diffusers folder (inpainting for `DiffEditor`, text-to-image for
        `BlendedLatentEditor`), a cached hub name or a single file (offline).

        `scheduler`: a diffusers scheduler class name built from the source's scheduler config
        (DDIM by default, as the paper samples), or None for the source's own scheduler.
        `config`: for single files, see `semani.modules.diffusion_parts.load_sd_components`.
        `torch_dtype`: load dtype (default: the constructor's `dtype`). Other keyword
        arguments go to the constructor.
        """
        torch_dtype = kwargs.get("dtype") if torch_dtype is None else torch_dtype
        parts = pretrained_parts(source, cls.inpaint, scheduler, config, torch_dtype)
        return cls(**parts, **kwargs)

    def model_side(self, side: int | str | None) -> int | None:
        """`side` as pixels: "native" is the UNet's own image size (`sample_size` latents times
        the VAE factor), what the model was trained at."""
        if side == "native":
            size = self.unet.config.sample_size
            return int(max(size) if isinstance(size, (list, tuple)) else size) * self.factor
        if side is not None and (not isinstance(side, int) or side < self.factor):
            raise ValueError(f'side must be a number of pixels >= {self.factor}, "native" or '
                             f"None, got {side!r}")  # fmt: skip
        return side

    def edit_region(self, image: Any, mask: Any, text: str, **kwargs: Any) -> Any:
        """`self._edit(image, mask, text, **kwargs)` on the whole image or, with
        ``region="entity"``, on the window around the mask, pasted back (`edit_in_region`)."""
        return edit_in_region(
            self.region,
            self.context,
            image,
            [mask],
            lambda crop, masks: self._edit(crop, masks[0], text, **kwargs),
        )

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """(N, C, h, w) latents -> (N, 3, h*f, w*f) float32 images in [0, 1]."""
        return decode_latents(self.vae, latents)

    @torch.inference_mode()
    def autoencode(self, image: Tensor) -> np.ndarray:
        """(3, H, W) float image in [-1, 1] -> (H, W, 3) uint8 after the VAE alone, on the
        model grid as `edit` sees it (resized, encoded, posterior mean, decoded, resized back):
        what a perfect denoiser could show through it."""
        vae, size = self.vae, tuple(image.shape[-2:])
        pixels = resize_bilinear(image[None].float(), model_size(*size, self.factor, self.side))
        mean = vae.encode(pixels.clamp(-1, 1).to(self.device, vae.dtype)).latent_dist.mean
        out = resize_bilinear(self.decode(mean * vae.config.scaling_factor), size)[0]
        return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class DiffEditor(LatentEditor):
    """Entity-level manipulation with a Stable-Diffusion-inpainting-style model (SeMani-Diff).

    Args:
        unet: 9-channel `UNet2DConditionModel` (noisy latent, mask, masked-image latent).
        vae: `AutoencoderKL`; its factor (8 for SD) sets the model grid.
        text_encoder, tokenizer: CLIP text encoder and its tokenizer.
        scheduler: any diffusers scheduler; a fresh copy of it runs each edit.
        steps, guidance_scale, feather, negative_text, eta: defaults of `edit`.
        side: resize the image so that its longer side is `side` before rounding to the grid
            (None: keep the input size; "native": the UNet's own size, its `sample_size` times
            the VAE factor, e.g. 512 for SD-2-inpainting).
        device, dtype: move the models (e.g. "cuda", torch.float16 or "float16"); None
            leaves them.
        vae_tiling: decode / encode large images in tiles (`vae.enable_tiling()`).
        guidance_form: "paper" (Eq. 15: the unconditional branch has the empty text and the
            empty mask condition) or "diffusers" (the empty text, the real mask).
        composite: paste the result into the input in pixel space (every pixel outside the mask
            the input's); False returns the decoded image itself, resized back.
        strength: 1 inpaints from noise; below 1 the entity's own latents are noised to that
            fraction of the schedule and denoised under the text (its shape and layout survive:
            "keep the shape, change the look"), as diffusers' `strength`.
        region: "image" resizes the whole image to the model grid; "entity" edits a window
            around the mask (its box grown by `context` times its longer side on every side,
            square where the image allows) and pastes it back at the image's resolution
            (`semani.manipulation.region`).
        context: the window's margin for ``region="entity"``, a fraction of the box's side.
        latent_cache: keep the VAE posteriors of the last N distinct model-grid inputs
            (`posterior`; ours, not the paper's): a repeated edit of a photo skips encodes;
            0: none.
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        steps: int = 50,
        guidance_scale: float = 7.5,
        feather: float = 4,
        negative_text: str = "",
        eta: float = 0.0,
        side: int | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        vae_tiling: bool = False,
        guidance_form: str = "paper",
        composite: bool = True,
        strength: float = 1.0,
        region: str = "image",
        context: float = 0.5,
        latent_cache: int = 4,
    ) -> None:
        self.region, self.context = check_region(region, context)
        if guidance_form not in GUIDANCE_FORMS:
            raise ValueError(
                f"guidance_form must be one of {GUIDANCE_FORMS}, got {guidance_form!r}"
            )
        if unet.config.in_channels != vae.config.latent_channels * 2 + 1:
            raise ValueError(
                f"DiffEditor needs an inpainting UNet with {vae.config.latent_channels * 2 + 1} "
                f"input channels (latent, mask, masked-image latent), got "
                f"{unet.config.in_channels}; for a text-to-image UNet use BlendedLatentEditor"
            )
        self._set_parts(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, vae_tiling,
                        latent_cache)  # fmt: skip
        self.steps, self.guidance_scale, self.feather = steps, guidance_scale, feather
        self.negative_text, self.eta, self.side = negative_text, eta, self.model_side(side)
        self.guidance_form, self.composite, self.strength = guidance_form, composite, strength

    @torch.inference_mode()
    def generate_latents(
        self,
        pixels: Tensor,
        mask: Tensor,
        text: str,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        negative_text: str | None = None,
        callback: StepCallback | None = None,
        strength: float | None = None,
    ) -> Tensor:
        """The denoising loop on the model grid.

        Args:
            pixels: (1, 3, h, w) in [-1, 1], h and w multiples of the VAE factor.
            mask: (1, 1, h, w) binary, 1 = re-paint.
            callback: called after every step with (index, timestep, latents).
            strength: 1 starts from noise (inpainting); below 1 from the image's own latents
                noised to the `strength` fraction of the schedule, and only that fraction of
                the steps runs (diffusers' `strength`): the entity's shape survives.
        Returns:
            (num_images, C, h/f, w/f) scaled latents.
        """
        from diffusers.utils.torch_utils import randn_tensor

        steps = steps or self.steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        negative_text = self.negative_text if negative_text is None else negative_text
        strength = self.strength if strength is None else float(strength)
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        cfg = scale > 1.0
        device, dtype = self.device, self.dtype
        embeds = text_embeddings(
            self.text_encoder, self.tokenizer, text, negative_text, num_images, cfg
        ).to(device, dtype)  # (N or 2N, L, D)
        scheduler = fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(steps, device=device)
        start = (steps - min(int(steps * strength), steps)) * scheduler.order
        if start >= len(scheduler.timesteps):
            raise ValueError(f"strength {strength} leaves no step of {steps}: raise either")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        timesteps = scheduler.timesteps[start:]
        h, w = pixels.shape[-2] // self.factor, pixels.shape[-1] // self.factor
        shape = (num_images, self.vae.config.latent_channels, h, w)
        if strength < 1:  # the image's latents, drawn before the noise (diffusers' order)
            image_latents = self.encode(pixels, generator).to(dtype)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if strength < 1:
            latents = scheduler.add_noise(image_latents.repeat(num_images, 1, 1, 1), latents,
                                          timesteps[:1].repeat(num_images))  # fmt: skip
        else:
            latents = latents * scheduler.init_noise_sigma  # (N, C, h, w)
        # E((1 - M) x): drawn from the generator after the noise, as diffusers does
        cond = inpaint_condition(self.encode, pixels, mask, generator, dtype)  # (1, 1 + C, h, w)
        cond = cond.repeat(num_images, 1, 1, 1)  # (N, 1 + C, h, w)
        if cfg:
            empty = cond  # diffusers: the unconditional branch keeps the mask and image
            if self.guidance_form == "paper":  # Eq. 15's ∅: the empty mask condition too
                everything = torch.ones_like(mask)  # (1, 1, h, w): re-paint every pixel
                empty = inpaint_condition(self.encode, pixels, everything, generator, dtype)
                empty = empty.repeat(num_images, 1, 1, 1)
            cond = torch.cat([empty, cond])  # (2N, 1 + C, h, w): [unconditional; conditional]
        extra = step_kwargs(scheduler, self.eta, generator)
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if cfg else latents  # (N or 2N, C, h, w)
            x = scheduler.scale_model_input(x, t)
            x = torch.cat([x, cond], 1)  # (N or 2N, 2C + 1, h, w)
            eps = guided_noise(self.unet, x, t, embeds, scale, cfg)  # (N, C, h, w)
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            if callback is not None:
                callback(i, t, latents)
        return latents

    def generate(
        self, image: Any, mask: Any, text: str, seed: int | None = None, **kwargs: Any
    ) -> Tensor:
        """Decoded images (N, 3, h, w) in [0, 1] on the model grid, before the composite.

        With the same seed (or generator), steps and guidance this is diffusers'
        `StableDiffusionInpaintPipeline(..., output_type="np")` output (channels first).
        Keyword arguments are those of `generate_latents`.
        """
        _, _, pixels, grid_mask = prepare_inputs(image, mask, self.factor, self.side)
        kwargs["generator"] = make_generator(seed, kwargs.get("generator"))
        return self.decode(self.generate_latents(pixels, grid_mask, text, **kwargs))

    def edit(
        self,
        image: Any,
        mask: Any,
        text: str,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images: int = 1,
        feather: float | None = None,
        negative_text: str | None = None,
        callback: StepCallback | None = None,
        strength: float | None = None,
    ) -> Any:
        """Re-paint the masked entity of `image` after `text`.

        Args:
            image: RGB PIL image, (H, W, 3) uint8 array, (3, H, W) uint8 tensor or (3, H, W)
                float tensor in [-1, 1]; any size.
            mask: (H, W) PIL / array / tensor, bool, 0..255 uint8 or 0..1 float; >= 0.5 (white)
                is edited.
            text: the target text.
            steps, guidance_scale, negative_text: the sampler (defaults from the constructor).
            seed / generator: the noise (a seed makes a CPU generator: the same on any device).
            num_images: how many samples of the same edit.
            feather: seam width in pixels inside the mask (see `feather_weights`).
            strength: see the constructor (None: its value).
        Returns:
            `num_images` edited images at the input size and of the input's kind (see
            `composite`); outside the mask they equal the input exactly. With the constructor's
            ``region="entity"`` the edit runs on a window around the mask, pasted back.
        """
        return self.edit_region(image, mask, text, steps=steps, guidance_scale=guidance_scale,
                                seed=seed, generator=generator, num_images=num_images,
                                feather=feather, negative_text=negative_text, callback=callback,
                                strength=strength)  # fmt: skip

    def _edit(
        self,
        image: Any,
        mask: Any,
        text: str,
        steps: int | None,
        guidance_scale: float | None,
        seed: int | None,
        generator: torch.Generator | None,
        num_images: int,
        feather: float | None,
        negative_text: str | None,
        callback: StepCallback | None,
        strength: float | None,
    ) -> Any:
        """`edit` on the whole of `image`."""
        src, pixel_mask, pixels, grid_mask = prepare_inputs(image, mask, self.factor, self.side)
        latents = self.generate_latents(
            pixels,
            grid_mask,
            text,
            steps=steps,
            guidance_scale=guidance_scale,
            generator=make_generator(seed, generator),
            num_images=num_images,
            negative_text=negative_text,
            callback=callback,
            strength=strength,
        )
        edited = resize_bilinear(self.decode(latents), tuple(src.original.shape[-2:])).clamp(0, 1)
        if self.composite:
            weights = feather_weights(
                pixel_mask[0, 0], self.feather if feather is None else feather
            )
        else:
            weights = torch.ones(edited.shape[-2:])
        return composite(src, edited, weights)

    __call__ = edit
