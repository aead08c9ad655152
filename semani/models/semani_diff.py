"""SeMani-Diff training: a Stable-Diffusion-inpainting-style latent diffusion model (Eq. 11-15).

`SemaniDiffModule` holds diffusers parts: a 9-channel `UNet2DConditionModel` (trained), an
`AutoencoderKL` and a CLIP text encoder + tokenizer (frozen unless `train_vae` /
`train_text_encoder`), and a `DDPMScheduler` for the forward process, built from the source's
scheduler config. The parts come from `source` (an SD-inpainting diffusers folder, a cached hub
name or a single file; see `semani.modules.diffusion_parts.load_inpaint_components`) or, for
from-scratch runs, from `tiny` (`tiny_inpaint_components` keyword arguments); never both.

Training step (Eq. 14), every draw from one CPU `torch.Generator` seeded by (seed, rank, global
step, batch index), in this order (`training_inputs`):
  1. text dropout `rand(B) < text_dropout`, 2. mask dropout `rand(B) < mask_dropout`,
  2b. joint dropout `rand(B) < joint_dropout` (both conditions empty at once),
  3. one mask per sample (`semani.data.inpaint_masks.MaskSampler`: an entity mask of the data
     set or a random box / brush-stroke mask; skipped where the batch brings its own
     `inpaint_mask`, drawn in the DataLoader workers with `data.inpaint_masks`),
  4. the VAE posterior sample of the image, 5. that of the masked image, 6. the noise,
  7. the timesteps.
The empty conditions of classifier-free guidance (Eq. 15): the paper replaces "the text guidance
and mask guidance with empty guidance ∅", and guides with ε(z_t, ∅) + s·(ε(z_t, c) − ε(z_t, ∅)),
so the model must know the pair (empty text, empty mask): `joint_dropout` empties both at once
(the `semani_diff_*` configs: 0.1, assumed), `text_dropout` and `mask_dropout` one alone (0.05
each, assumed: diffusers' guidance keeps the mask, Blended LDM on an inpainting model keeps the
text). A dropped text is the empty caption ""; a dropped mask is the all-ones mask ("re-paint
everything"), so the masked image
`x * (M < 0.5)` is all zeros (mid-gray) and its latent is the VAE encoding of that gray image:
exactly what diffusers' `StableDiffusionInpaintPipeline` feeds for a full mask. The UNet input is
`cat([z_t, M, E((1 - M) x)])` (diffusers' channel order), the target the noise
(`prediction_type="epsilon"`) or `scheduler.get_velocity` ("v_prediction"), the loss the MSE.

Switches: `gradient_checkpointing`; bf16 is the trainer's `precision: bf16-mixed` (weights stay
fp32, the forward runs under autocast); `use_ema` keeps diffusers' `EMAModel` of the UNet (in
the checkpoint; its weights are used for validation, samples and export); `use_8bit_adam`
(bitsandbytes' AdamW8bit); `cache_latents` keeps each training image's VAE posterior mean/std in
memory (CPU, float32: ~130 KB per 512 px image) keyed by the sample `index`, so the VAE encoder
sees each image once (the masked image still goes through it every step: its mask is random).
With `cache_latents` the data must not be augmented (the same index must give the same pixels;
our readers do not augment). `train_vae` trains the VAE jointly with its own reconstruction +
KL loss (the diffusion loss does not reach it): only for from-scratch toy runs (ShapesWorld),
where a random frozen VAE cannot reconstruct anything; Stable Diffusion keeps its VAE frozen.

Checkpoints keep every weight (UNet, VAE, text encoder, EMA): the source is re-read only for the
architecture, tokenizer and scheduler config when a checkpoint is opened (`source=` overrides a
moved folder). They name their class, so `semani.load_model(ckpt)` opens them.
`save_pretrained(folder)` writes a diffusers `StableDiffusionInpaintPipeline` folder (DDIM
scheduler, EMA weights when on) that `DiffEditor.from_pretrained` reads; training ends by writing
one to `<run>/<export_dir>`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from semani.data.inpaint_masks import MaskSampler
from semani.models.diff_training import (
    PREDICTION_TYPES,
    SwappableEMA,
    adamw_8bit,
    build_components,
    replace_vae,
    step_generator,
    training_target,
)
from semani.modules.diffusion_parts import encode_text, latent_mask, tokenize_text
from semani.utils.atomic import atomic_dir
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    check_overrides,
    export_dir,
    get_state_dict,
    load_state_dict_strict,
    name_checkpoint,
    plain_hparams,
)
from semani.utils.lr_schedule import cosine_warmup_config, decay_groups

log = logging.getLogger(__name__)

__all__ = ["PREDICTION_TYPES", "SemaniDiffModule", "step_generator", "training_target"]

LR_SCHEDULES = ("cosine", "constant")
_EMA_KEY = "semani_ema"  # checkpoint entry: EMAModel.state_dict()
_MAX_CACHED_CAPTIONS = 200_000  # token ids remembered by `caption_ids` (~60 MB at 77 ids)
_TRAIN, _VAL, _SAMPLES = 0, 1, 2  # generator streams


class SemaniDiffModule(pl.LightningModule):
    """SeMani-Diff inpainting training (see the module docstring).

    Args:
        source: SD-inpainting weights (diffusers folder, cached hub name, single file).
        tiny: `tiny_inpaint_components` kwargs instead (random init, from scratch).
        config: for a single-file `source`, the diffusers folder with its configs.
        vae: a VAE folder (`experiment=vae_shapes`' <run>/vae, or a pipeline folder with vae/)
            that replaces the source's or tiny VAE, with its own scaling factor.
        prediction_type: "epsilon" | "v_prediction"; None: the source scheduler's.
        train_text_encoder, train_vae: train these too (frozen otherwise).
        vae_kl_weight: with train_vae, weight of the per-element KL in the VAE loss.
        vae_scaling_factor: set the VAE's latent scaling factor (None: its own, 0.18215 in SD).
        masks: `MaskSampler` kwargs (entity/box/stroke weights, entity_union, coverage).
        text_dropout, mask_dropout: per-sample probabilities of one empty condition.
        joint_dropout: per-sample probability of both empty conditions at once (Eq. 15's ∅).
        lr, betas, weight_decay, eps: AdamW (weight decay on >= 2-D weights only).
        warmup_steps, lr_schedule, min_lr_ratio: linear warm-up, then "cosine" (to
            min_lr_ratio * lr at the trainer's last step) or "constant"; per step.
        use_8bit_adam: bitsandbytes' AdamW8bit instead of torch's AdamW.
        gradient_checkpointing: on the UNet (and the text encoder when trained).
        use_ema, ema_decay, ema_warmup: diffusers' EMAModel of the UNet.
        cache_latents: cache the training images' VAE posteriors by sample `index`.
        val_timesteps: validation/test loss at these timesteps (fixed noise, masks and seeds).
        val_sample_steps, val_guidance_scale: `log_images` inpaints with DiffEditor (DDIM) in
            this many steps (0: no samples).
        export_dir: `<run>/<export_dir>` gets the diffusers folder at the end of training.
        seed: seeds every generator of the training and validation steps.
    """

    def __init__(
        self,
        source: str | None = None,
        tiny: Mapping[str, Any] | None = None,
        config: str | None = None,
        vae: str | None = None,
        prediction_type: str | None = None,
        train_text_encoder: bool = False,
        train_vae: bool = False,
        vae_kl_weight: float = 1e-2,
        vae_scaling_factor: float | None = None,
        masks: Mapping[str, Any] | None = None,
        text_dropout: float = 0.1,
        mask_dropout: float = 0.1,
        joint_dropout: float = 0.0,
        lr: float = 1e-5,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
        warmup_steps: int = 500,
        lr_schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        use_8bit_adam: bool = False,
        gradient_checkpointing: bool = False,
        use_ema: bool = False,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        cache_latents: bool = False,
        val_timesteps: Sequence[int] = (100, 300, 500, 700, 900),
        val_sample_steps: int = 20,
        val_guidance_scale: float = 7.5,
        export_dir: str | None = "diffusers",
        seed: int = 0,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        source = None if source is None else str(source)
        vae = None if vae is None else str(vae)
        tiny, masks = plain_hparams(tiny), plain_hparams(masks)
        betas = [float(b) for b in betas]
        val_timesteps = [int(t) for t in val_timesteps]
        dropouts = {"text_dropout": text_dropout, "mask_dropout": mask_dropout,
                    "joint_dropout": joint_dropout}  # fmt: skip
        for name, p in dropouts.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; use one of {LR_SCHEDULES}")
        if cache_latents and train_vae:
            raise ValueError("cache_latents=true needs a frozen VAE: set train_vae=false")
        if use_8bit_adam:
            adamw_8bit()  # fail now, not when fitting starts
        self.save_hyperparameters()
        self.mask_sampler = MaskSampler(**(masks or {}))
        self._caption_ids: dict[str, Tensor] = {}

        parts = build_components(source, tiny, config)
        if vae is not None:
            parts["vae"] = replace_vae(parts["vae"], vae)
        self.unet, self.vae = parts["unet"], parts["vae"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.source_scheduler_config = dict(parts["scheduler"].config)
        extra = {"prediction_type": prediction_type} if prediction_type else {}
        self.noise_scheduler = DDPMScheduler.from_config(self.source_scheduler_config, **extra)
        kind = self.noise_scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {kind!r}: SemaniDiffModule trains {PREDICTION_TYPES}"
            )
        steps = self.noise_scheduler.config.num_train_timesteps
        if not all(0 <= t < steps for t in val_timesteps):
            raise ValueError(f"val_timesteps must be in [0, {steps}), got {val_timesteps}")
        if vae_scaling_factor is not None:
            self.vae.register_to_config(scaling_factor=float(vae_scaling_factor))
        if not train_vae:
            self.vae.eval().requires_grad_(False)
        if not train_text_encoder:
            self.text_encoder.eval().requires_grad_(False)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.ema = SwappableEMA(self.unet, ema_decay, ema_warmup) if use_ema else None
        self._eval_swapped = False  # ... put there by on_validation/test_epoch_start
        self._latent_cache: dict[int, tuple[Tensor, Tensor]] = {}
        n = sum(p.numel() for p in self.unet.parameters())
        trained = ["unet"] + ["text_encoder"] * train_text_encoder + ["vae"] * train_vae
        log.info(
            "SemaniDiffModule: UNet %.1fM parameters, %s, trains %s%s",
            n / 1e6, kind, "+".join(trained), ", EMA" if use_ema else "",
        )  # fmt: skip

    # ---------------------------------------------------------------- frozen parts, EMA

    def train(self, mode: bool = True) -> SemaniDiffModule:
        """Train mode for the trained parts only; frozen ones stay in eval mode."""
        super().train(mode)
        if not self.hparams.train_vae:
            self.vae.eval()
        if not self.hparams.train_text_encoder:
            self.text_encoder.eval()
        return self

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the UNet holds the EMA weights (a no-op without EMA or if they are
        already in); the training weights are put back afterwards."""
        with self.ema.weights() if self.ema is not None else contextlib.nullcontext():
            yield

    # validation and test run on the EMA weights, swapped in once per epoch
    def on_validation_epoch_start(self) -> None:
        self._eval_swapped = self.ema is not None and self.ema.swap_in()

    def on_validation_epoch_end(self) -> None:
        if self._eval_swapped:
            self.ema.swap_out()
        self._eval_swapped = False

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (once per step, not per accumulated
        micro-batch; before the checkpoint callbacks of the batch run)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update()

    # ---------------------------------------------------------------- inputs

    def _posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std (B, C, h, w), unscaled."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def _image_posterior(self, batch: Mapping[str, Any], use_cache: bool) -> tuple[Tensor, Tensor]:
        images = batch["image"]  # (B, 3, H, W)
        if not use_cache:
            return self._posterior(images)
        if "index" not in batch:
            raise ValueError("cache_latents=true needs the sample 'index' in every batch")
        keys = [int(i) for i in batch["index"]]
        todo = [j for j, k in enumerate(keys) if k not in self._latent_cache]
        if todo:
            mean, std = self._posterior(images[todo])
            for j, m, s in zip(todo, mean.cpu(), std.cpu()):
                self._latent_cache[keys[j]] = (m, s)
        mean = torch.stack([self._latent_cache[k][0] for k in keys]).to(images.device)
        std = torch.stack([self._latent_cache[k][1] for k in keys]).to(images.device)
        return mean, std  # (B, C, h, w)

    def training_inputs(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator,
        use_cache: bool = False,
        dropout: bool = True,
    ) -> dict[str, Any]:
        """Everything one denoising step needs, drawn from `generator` (order in the module
        docstring). `dropout=False` keeps every condition (the draws still happen).

        Returns: `latents` (B, C, h, w) scaled, `noise`, `timesteps` (B,), `mask` (B, 1, H, W),
        `mask_latent` (B, 1, h, w), `masked_image` (B, 3, H, W), `masked_latents` (B, C, h, w)
        scaled, `captions` (the empty one where dropped), `drop_text`, `drop_mask` (B,) bool,
        `mask_kinds`, and `posterior` (mean, std, sample) of the image, unscaled.
        """
        images = batch["image"]  # (B, 3, H, W)
        b, _, h, w = images.shape
        device = images.device
        hp = self.hparams
        drop_text = torch.rand(b, generator=generator) < hp.text_dropout  # (B,)
        drop_mask = torch.rand(b, generator=generator) < hp.mask_dropout  # (B,)
        if hp.get("joint_dropout", 0.0) > 0:  # Eq. 15's empty guidance: both at once
            joint = torch.rand(b, generator=generator) < hp.joint_dropout  # (B,)
            drop_text, drop_mask = drop_text | joint, drop_mask | joint
        if not dropout:
            drop_text, drop_mask = torch.zeros_like(drop_text), torch.zeros_like(drop_mask)
        if "inpaint_mask" in batch:  # drawn in the DataLoader workers (data.inpaint_masks)
            mask, kinds = batch["inpaint_mask"].float().clone(), list(batch["mask_kind"])
        else:
            ents = batch.get("entity_masks")
            mask, kinds = self.mask_sampler.sample(b, (h, w), generator, ents)
        mask = mask.to(device, images.dtype)  # (B, 1, H, W)
        mask[drop_mask.to(device)] = 1.0  # the empty mask condition: re-paint everything
        masked_image = images * (mask < 0.5)  # (B, 3, H, W), as diffusers' pipeline

        with torch.set_grad_enabled(hp.train_vae and torch.is_grad_enabled()):
            mean, std = self._image_posterior(batch, use_cache)  # (B, C, h, w)
        sample = mean + std * torch.randn(mean.shape, generator=generator).to(device)
        with torch.no_grad():
            m_mean, m_std = self._posterior(masked_image)
            m_sample = m_mean + m_std * torch.randn(m_mean.shape, generator=generator).to(device)
        scale = self.vae.config.scaling_factor
        latents = sample.detach() * scale  # the diffusion loss never reaches the VAE
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=generator).to(device)
        captions = ["" if d else c for d, c in zip(drop_text.tolist(), batch["caption"])]
        return {
            "latents": latents,
            "noise": noise,
            "timesteps": timesteps,
            "mask": mask,
            "mask_latent": latent_mask(mask, tuple(latents.shape[-2:])),  # (B, 1, h, w)
            "masked_image": masked_image,
            "masked_latents": m_sample * scale,
            "captions": captions,
            "drop_text": drop_text,
            "drop_mask": drop_mask,
            "mask_kinds": kinds,
            "posterior": (mean, std, sample),
        }

    def caption_ids(self, captions: Sequence[str]) -> Tensor:
        """Captions -> (B, 77) token ids (`tokenize_text`), remembered per caption: training
        sees every caption many times and the tokenizer runs on the CPU, in the training step
        (the cache is emptied when it holds `_MAX_CACHED_CAPTIONS`)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._caption_ids]
        if missing:
            if len(self._caption_ids) + len(missing) > _MAX_CACHED_CAPTIONS:
                self._caption_ids.clear()
            self._caption_ids.update(zip(missing, tokenize_text(self.tokenizer, missing)))
        return torch.stack([self._caption_ids[c] for c in captions])  # (B, L)

    def text_embeddings(self, captions: Sequence[str]) -> Tensor:
        """Captions -> CLIP hidden states (B, 77, D); gradients only if the encoder trains."""
        ids = self.caption_ids(captions)
        with torch.set_grad_enabled(self.hparams.train_text_encoder and torch.is_grad_enabled()):
            return encode_text(self.text_encoder, self.tokenizer, list(captions), ids=ids)

    # ---------------------------------------------------------------- losses

    def denoising_loss(
        self, inputs: Mapping[str, Any], embeds: Tensor, timesteps: Tensor
    ) -> Tensor:
        """Eq. 14: MSE between the UNet output on [z_t, M, E((1-M)x)] and the target."""
        latents, noise = inputs["latents"], inputs["noise"]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        x = torch.cat([noisy, inputs["mask_latent"], inputs["masked_latents"]], 1)  # (B, 2C+1, ..)
        pred = self.unet(x, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    def compute_loss(
        self, batch: Mapping[str, Any], generator: torch.Generator, use_cache: bool = False
    ) -> dict[str, Tensor]:
        """The training losses of a batch: `loss` (what is minimised) and `diffusion`, plus
        `vae_rec` and `vae_kl` with train_vae."""
        inputs = self.training_inputs(batch, generator, use_cache)
        embeds = self.text_embeddings(inputs["captions"])
        diffusion = self.denoising_loss(inputs, embeds, inputs["timesteps"])
        out = {"loss": diffusion, "diffusion": diffusion}
        if self.hparams.train_vae:
            mean, std, sample = inputs["posterior"]
            rec = self.vae.decode(sample.to(self.vae.dtype), return_dict=False)[0]
            out["vae_rec"] = F.mse_loss(rec.float(), batch["image"].float())
            out["vae_kl"] = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.log()).mean()
            out["loss"] = diffusion + out["vae_rec"] + self.hparams.vae_kl_weight * out["vae_kl"]
        return out

    def eval_losses(self, batch: Mapping[str, Any], batch_idx: int) -> dict[int, Tensor]:
        """Held-out denoising loss at each of `val_timesteps`: the same masks, noise and seeds
        every time (no condition dropout)."""
        generator = step_generator(self.hparams.seed, _VAL, self.global_rank, batch_idx)
        inputs = self.training_inputs(batch, generator, dropout=False)
        embeds = self.text_embeddings(inputs["captions"])
        b = inputs["latents"].shape[0]
        return {
            t: self.denoising_loss(inputs, embeds, torch.full((b,), t, device=self.device))
            for t in self.hparams.val_timesteps
        }

    # ---------------------------------------------------------------- Lightning loops

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        """Everything to `device` but the entity masks: the mask sampler reads them on the CPU
        (moving them to a GPU and back costs a synchronisation per sample)."""
        ents = batch.pop("entity_masks", None) if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if ents is not None:
            batch["entity_masks"] = ents
        return batch

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        generator = step_generator(
            self.hparams.seed, _TRAIN, self.global_rank, self.global_step, batch_idx
        )
        out = self.compute_loss(batch, generator, use_cache=self.hparams.cache_latents)
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=bs)  # fmt: skip
        for key in ("vae_rec", "vae_kl"):
            if key in out:
                self.log(f"train/{key}", out[key].detach(), on_step=True, batch_size=bs)
        return out["loss"]

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, stage: str) -> None:
        losses = self.eval_losses(batch, batch_idx)
        bs = batch["image"].shape[0]
        mean = torch.stack(list(losses.values())).mean()
        self.log(f"{stage}/loss", mean, prog_bar=True, sync_dist=True, batch_size=bs)
        for t, loss in losses.items():
            self.log(f"{stage}/loss_t{t}", loss, sync_dist=True, batch_size=bs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or AdamW8bit) on the trained parameters, warm-up then cosine or constant."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        cls = adamw_8bit() if hp.use_8bit_adam else torch.optim.AdamW
        opt = cls(
            decay_groups(params, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps
        )
        total = None if hp.lr_schedule == "constant" else self.trainer.estimated_stepping_batches
        return cosine_warmup_config(
            opt, total, hp.warmup_steps, hp.min_lr_ratio, schedule=hp.lr_schedule
        )

    # ---------------------------------------------------------------- images

    @contextlib.contextmanager
    def _sampling_parts(self) -> Iterator[None]:
        """EMA weights in; DiffEditor freezes the modules it is given (eval, no gradients):
        put requires_grad and the train/eval mode back afterwards."""
        flags, was_training = [(p, p.requires_grad) for p in self.parameters()], self.training
        try:
            with self.ema_weights():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            self.train(was_training)

    def log_images(self, batch: Mapping[str, Any], max_images: int = 4, **_: Any) -> dict:
        """`inputs`, `masked` (mask in mid-gray) and, with val_sample_steps > 0, `samples`:
        each masked region re-painted after the sample's own caption by DiffEditor (DDIM,
        EMA weights if on); all (N, 3, H, W) in [-1, 1]. Masks and seeds are fixed."""
        from diffusers import DDIMScheduler

        from semani.manipulation.diff_editor import DiffEditor

        images = batch["image"][:max_images]
        n, _, h, w = images.shape
        ents = batch.get("entity_masks")
        generator = step_generator(self.hparams.seed, _SAMPLES)
        masks, _ = self.mask_sampler.sample(n, (h, w), generator, ents[:n] if ents else None)
        masks = masks.to(images.device, images.dtype)  # (N, 1, H, W)
        out = {"inputs": images, "masked": images * (masks < 0.5)}
        steps = self.hparams.val_sample_steps
        if steps <= 0:
            return out
        with self._sampling_parts():
            scheduler = DDIMScheduler.from_config(self.export_scheduler_config())
            editor = DiffEditor(
                self.unet, self.vae, self.text_encoder, self.tokenizer, scheduler, steps=steps,
                guidance_scale=self.hparams.val_guidance_scale, feather=0,
            )  # fmt: skip
            samples = [
                editor.edit(images[i], masks[i, 0], batch["caption"][i], seed=i)[0]
                for i in range(n)
            ]
        out["samples"] = torch.stack(samples).to(images.device)  # (N, 3, H, W)
        return out

    # ---------------------------------------------------------------- export

    def export_scheduler_config(self) -> dict[str, Any]:
        """The source's scheduler config with the trained prediction type (for DDIM)."""
        kind = self.noise_scheduler.config.prediction_type
        return {**self.source_scheduler_config, "prediction_type": kind}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a diffusers `StableDiffusionInpaintPipeline` folder (DDIM scheduler, EMA UNet
        weights when on, no safety checker), atomically: into a temporary sibling, then renamed
        over `folder`. Opens with `StableDiffusionInpaintPipeline.from_pretrained(folder)` and
        `DiffEditor.from_pretrained(folder)`."""
        from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

        folder = Path(folder)
        scheduler = DDIMScheduler.from_config(self.export_scheduler_config())
        with self.ema_weights(), atomic_dir(folder) as tmp:
            pipe = StableDiffusionInpaintPipeline(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                unet=self.unet, scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
            pipe.save_pretrained(tmp)
        log.info("SeMani-Diff pipeline written to %s%s", folder, " (EMA weights)" * bool(self.ema))
        return folder

    def on_train_end(self) -> None:
        """Write the diffusers folder to `<run>/<export_dir>` (not in fast_dev_run)."""
        folder = export_dir(self)
        if folder is not None:
            self.save_pretrained(folder)

    # ---------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name the class; keep the EMA state; always save the training weights."""
        name_checkpoint(self, checkpoint)
        if self.ema is None:
            return
        # saved from within `ema_weights`: the UNet holds the EMA copy
        checkpoint["state_dict"].update(self.ema.training_weights("unet."))
        checkpoint[_EMA_KEY] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_EMA_KEY)
        if self.ema is not None and state is not None:
            self.ema.load_state_dict(state)
        elif self.ema is not None:
            log.warning("use_ema=true but the checkpoint has no EMA state: EMA starts afresh")

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> SemaniDiffModule:
        """A checkpoint already read -> a new module; the parts are rebuilt from the saved
        `source` / `tiny` (architecture, tokenizer, scheduler) and every weight is then loaded
        from the checkpoint. `use_8bit_adam` is turned off unless overridden (loading needs no
        optimiser)."""
        hp = checkpoint.get("hyper_parameters")
        if not isinstance(hp, Mapping) or not ({"source", "tiny"} <= set(hp)):
            raise CheckpointMismatchError(
                f"checkpoint '{source}' is not a SemaniDiffModule checkpoint (its "
                "hyper_parameters have no 'source' / 'tiny')"
            )
        check_overrides(cls, overrides)
        kwargs = {**dict(hp), "use_8bit_adam": False, **overrides}
        if overrides.get("source") is not None:
            kwargs["tiny"] = None
        elif overrides.get("tiny") is not None:
            kwargs["source"] = None
        model = cls(**kwargs)
        load_state_dict_strict(
            model, get_state_dict(checkpoint, source), source, expected="a SemaniDiffModule"
        )
        model.on_load_checkpoint(dict(checkpoint))
        log.info("loaded SemaniDiffModule from %s", source)
        return model
