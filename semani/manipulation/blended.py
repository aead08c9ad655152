"""Blended Latent Diffusion (Avrahami et al., 2023): the paper's diffusion baseline.

Inference only, on a plain 4-channel text-to-image latent-diffusion UNet. Two variants of the
loop (`variant`), both with classifier-free guidance as `DiffEditor` and the source latents the
VAE posterior *mean* of the image (as the authors' scripts take it):

- **"paper"** (the default, assumed: the SeMani paper does not say which it ran): the Blended
  LDM paper's Algorithm 1 and the authors' original LDM code. Start from the source noised to
  the first timestep T, and *before* every step blend the latents outside the mask with the
  source noised to that step's own t: `z = M * z + (1 - M) * add_noise(z_src, noise, t)`, then
  denoise; no step is skipped.
- **"sd_script"**: the authors' Stable Diffusion script: start from pure noise (times
  `init_noise_sigma`, 1 for DDIM), skip the first `skip` fraction of the DDIM steps (0.25: 50
  steps run the last 38; sigma-scaled schedulers such as Euler would want the start sigma
  instead: use DDIM), and *after* every step blend with the source noised to the step's own
  (current) timestep t.

The image and mask go to the model grid as `DiffEditor` does (multiples of the VAE factor); the
mask is resized to the latent grid (nearest), binarised at 0.5 and optionally dilated by
`dilation` latent cells. At the end the latents are decoded and resized back; the pixel-space
composite of `DiffEditor` is optional (off by default: the baseline as published keeps the
VAE's reconstruction of the background). `region="entity"` edits a context window around the
mask and pastes it back (`semani.manipulation.region`; without the composite the whole window is
the decoder's output).

`unmasked_inpainting=True` runs it on a 9-channel inpainting UNet instead (a SeMani-Diff model)
used as a text-to-image model: every UNet call gets the empty mask condition, an all-ones mask
and the latent of the all-gray masked image, which is what classifier-free training with
`mask_dropout` teaches the model to read as "no image context" (SemaniDiffModule). With it the
baseline and SeMani-Diff share their weights and differ only in how the edit is made (ShapesWorld,
where no separate text-to-image model is trained).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from semani.manipulation.diff_editor import (
    LatentEditor,
    fresh_scheduler,
    guided_noise,
    inpaint_condition,
    make_generator,
    step_kwargs,
    text_embeddings,
)
from semani.manipulation.pixels import composite as composite_images
from semani.manipulation.pixels import feather_weights, prepare_inputs, resize_bilinear
from semani.manipulation.region import check_region
from semani.modules.diffusion_parts import latent_mask

log = logging.getLogger(__name__)

__all__ = ["BlendedLatentEditor"]

# (step index, timestep, latents after the step, {"source_latents", "noise", "mask"}): for
# "sd_script" the latents are blended with the noise of this step; for "paper" they are the
# step's output, blended before it with this noise
BlendCallback = Callable[[int, Tensor, Tensor, dict[str, Tensor]], None]
VARIANTS = ("paper", "sd_script")


class BlendedLatentEditor(LatentEditor):
    """Blended Latent Diffusion on a text-to-image Stable-Diffusion model.

    Args:
        unet: 4-channel `UNet2DConditionModel` (9-channel with `unmasked_inpainting`).
        vae, text_encoder, tokenizer, scheduler: as `DiffEditor`.
        steps, guidance_scale, negative_text, eta: defaults of `edit`.
        variant: "paper" (Algorithm 1) or "sd_script" (the authors' SD script), see above.
        skip: "sd_script" only: the fraction of the first (noisiest) steps skipped (0.25).
        dilation: grow the latent mask by this many latent cells (0: none).
        composite: paste the result into the input in pixel space (see `DiffEditor`).
        feather: the composite's seam width in pixels (see `feather_weights`).
        side, device, dtype, vae_tiling: as `DiffEditor`.
        unmasked_inpainting: `unet` is an inpainting UNet, run with the empty mask condition
            (module docstring).
        region, context: "image" or "entity" (a window around the mask, its margin `context`
            times the box's side), as `DiffEditor`.
        latent_cache: as `DiffEditor` (the source image's posterior).
    """

    inpaint = False  # from_pretrained reads a text-to-image folder

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        steps: int = 50,
        guidance_scale: float = 7.5,
        variant: str = "paper",
        skip: float = 0.25,
        dilation: int = 0,
        composite: bool = False,
        feather: float = 0,
        negative_text: str = "",
        eta: float = 0.0,
        side: int | str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        vae_tiling: bool = False,
        unmasked_inpainting: bool = False,
        region: str = "image",
        context: float = 0.5,
        latent_cache: int = 4,
    ) -> None:
        self.region, self.context = check_region(region, context)
        if region == "entity" and not composite:
            log.warning("region=entity without composite: the whole context window is the "
                        "decoder's output, its border visible in the image")  # fmt: skip
        c = vae.config.latent_channels
        want = 2 * c + 1 if unmasked_inpainting else c
        if unet.config.in_channels != want:
            kind = "an inpainting" if unmasked_inpainting else "a text-to-image"
            hint = (
                "set unmasked_inpainting=false for a text-to-image UNet"
                if unmasked_inpainting
                else "for an inpainting UNet use DiffEditor, or unmasked_inpainting=true to run "
                "Blended LDM on it with the empty mask condition"
            )
            raise ValueError(
                f"BlendedLatentEditor needs {kind} UNet with {want} input channels, got "
                f"{unet.config.in_channels}; {hint}"
            )
        if not 0 <= skip < 1:
            raise ValueError(f"skip must be in [0, 1), got {skip}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self._set_parts(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, vae_tiling,
                        latent_cache)  # fmt: skip
        self.steps, self.guidance_scale = steps, guidance_scale
        self.negative_text, self.eta = negative_text, eta
        self.skip, self.dilation, self.side = skip, dilation, self.model_side(side)
        self.composite, self.feather = composite, feather
        self.unmasked_inpainting = unmasked_inpainting

    def empty_condition(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        """The inpainting UNet's "no image context" channels for a model-grid image (1, 3, H, W):
        `inpaint_condition` with an all-ones mask, (1, 1 + C, H/f, W/f)."""
        everything = torch.ones_like(pixels[:, :1])  # (1, 1, H, W): re-paint every pixel
        return inpaint_condition(self.encode, pixels, everything, generator, self.dtype)

    def latent_mask(self, mask: Tensor) -> Tensor:
        """Model-grid pixel mask (1, 1, h*f, w*f) -> binary latent mask (1, 1, h, w)."""
        size = (mask.shape[-2] // self.factor, mask.shape[-1] // self.factor)
        m = (latent_mask(mask.float(), size) >= 0.5).float()  # (1, 1, h, w)
        if self.dilation > 0:
            k = self.dilation
            m = F.max_pool2d(m, 2 * k + 1, stride=1, padding=k)
        return m

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
        callback: BlendCallback | None = None,
    ) -> Tensor:
        """The blended denoising loop: (1, 3, h, w) in [-1, 1] and (1, 1, h, w) binary -> latents.

        `callback(i, t, latents, {"source_latents", "noise", "mask"})` runs after every
        step's blend. Returns (num_images, C, h/f, w/f).
        """
        from diffusers.utils.torch_utils import randn_tensor

        steps = steps or self.steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        negative_text = self.negative_text if negative_text is None else negative_text
        cfg = scale > 1.0
        device, dtype = self.device, self.dtype
        embeds = text_embeddings(
            self.text_encoder, self.tokenizer, text, negative_text, num_images, cfg
        ).to(device, dtype)  # (N or 2N, L, D)
        scheduler = fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(steps, device=device)
        paper = self.variant == "paper"
        start = 0 if paper else int(steps * self.skip) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        timesteps = scheduler.timesteps[start:]
        posterior = self.posterior(pixels)
        source = (posterior.mean * self.vae.config.scaling_factor).to(dtype)  # (1, C, h, w)
        source = source.repeat(num_images, 1, 1, 1)  # (N, C, h, w)
        m = self.latent_mask(mask.to(device)).to(dtype)  # (1, 1, h, w)
        latents = randn_tensor(source.shape, generator=generator, device=device, dtype=dtype)
        if paper:  # the source noised to the first timestep (Algorithm 1's z_k)
            latents = scheduler.add_noise(source, latents, timesteps[:1])
        else:
            latents = latents * scheduler.init_noise_sigma  # (N, C, h, w)
        extra = step_kwargs(scheduler, self.eta, generator)
        cond = None
        if self.unmasked_inpainting:
            cond = self.empty_condition(pixels, generator)  # (1, 1 + C, h, w)
            cond = cond.repeat(num_images * (1 + cfg), 1, 1, 1)
        for i, t in enumerate(timesteps):
            if paper:  # blend before the step, at its own t
                noise = randn_tensor(source.shape, generator=generator, device=device, dtype=dtype)
                latents = m * latents + (1 - m) * scheduler.add_noise(source, noise, t.reshape(1))
            x = torch.cat([latents] * 2) if cfg else latents  # (N or 2N, C, h, w)
            x = scheduler.scale_model_input(x, t)
            if cond is not None:
                x = torch.cat([x, cond], 1)  # (N or 2N, 2C + 1, h, w)
            eps = guided_noise(self.unet, x, t, embeds, scale, cfg)  # (N, C, h, w)
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            if not paper:  # blend after the step, at the step's (current) t
                noise = randn_tensor(source.shape, generator=generator, device=device, dtype=dtype)
                latents = m * latents + (1 - m) * scheduler.add_noise(source, noise, t.reshape(1))
            if callback is not None:
                callback(i, t, latents, {"source_latents": source, "noise": noise, "mask": m})
        return latents

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
        composite: bool | None = None,
        feather: float | None = None,
        negative_text: str | None = None,
        callback: BlendCallback | None = None,
    ) -> Any:
        """Edit the masked region of `image` after `text` (inputs and outputs as
        `DiffEditor.edit`). Without the composite every pixel (of the context window, with
        ``region="entity"``) is the decoder's output."""
        return self.edit_region(image, mask, text, steps=steps, guidance_scale=guidance_scale,
                                seed=seed, generator=generator, num_images=num_images,
                                composite=composite, feather=feather,
                                negative_text=negative_text, callback=callback)  # fmt: skip

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
        composite: bool | None,
        feather: float | None,
        negative_text: str | None,
        callback: BlendCallback | None,
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
        )
        edited = resize_bilinear(self.decode(latents), tuple(src.original.shape[-2:])).clamp(0, 1)
        feather = self.feather if feather is None else feather
        if self.composite if composite is None else composite:
            weights = feather_weights(pixel_mask[0, 0], feather)
        else:
            weights = torch.ones(edited.shape[-2:])
        return composite_images(src, edited, weights)

    __call__ = edit
