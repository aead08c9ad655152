"""Train a latent-diffusion VAE on its own (`experiment=vae_shapes`): SeMani-Diff's first stage.

`VAEModule` trains a diffusers `AutoencoderKL` (a tiny random one from
`semani.modules.diffusion_parts.tiny_vae`, or an existing one from a folder) with a
reconstruction loss plus a small per-element KL to the unit Gaussian, as the latent-diffusion
autoencoders are trained (without their perceptual and adversarial terms, which flat synthetic
images do not need). A VAE trained jointly with the diffusion model (`SemaniDiffModule`'s
`train_vae`) is pulled towards latents that are easy to denoise and reconstructs colours poorly;
this stage gives the diffusion model a fixed, faithful latent space (`model.vae=<run>/vae`).

At the end of training the latent scaling factor is set as Stable Diffusion's was, 1 / the
standard deviation of the training latents (posterior samples over `scale_batches` batches), and
the VAE is written with `save_pretrained` to `<run>/<export_dir>` (`AutoencoderKL.from_pretrained`
opens it). Logs `train/rec`, `train/kl`, `val/rec_mse` (reconstruction from the posterior means,
in [-1, 1] pixel units), `val/kl`, and `vae/scaling_factor` at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from semani.modules.diffusion_parts import tiny_vae
from semani.utils.atomic import atomic_dir
from semani.utils.checkpoint import export_dir, name_checkpoint, plain_hparams, rebuild_strict
from semani.utils.lr_schedule import cosine_warmup_config, decay_groups

log = logging.getLogger(__name__)

__all__ = ["VAEModule", "load_vae", "REC_LOSSES"]

REC_LOSSES = ("mse", "l1")


def load_vae(path: str | Path) -> Any:
    """An `AutoencoderKL` from a VAE folder (`save_pretrained`: config.json + weights) or from
    the `vae/` of a diffusers pipeline folder."""
    from diffusers import AutoencoderKL

    folder = Path(path).expanduser()
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no VAE at {path}: pass the folder a VAE stage writes (<run>/vae of "
            "`python train.py experiment=vae_shapes`, config.json + weights) or a diffusers "
            "pipeline folder with a vae/ subfolder"
        )
    return AutoencoderKL.from_pretrained(folder)


class VAEModule(pl.LightningModule):
    """Reconstruction + KL training of an `AutoencoderKL` (see the module docstring).

    Args:
        tiny: `tiny_vae` keyword arguments (seed, channels, layers_per_block, latent_size):
            a random VAE trained from scratch.
        source: instead, a VAE folder (or a pipeline folder with vae/) to continue training.
        rec_loss: "mse" | "l1" reconstruction loss on [-1, 1] pixels.
        kl_weight: weight of the per-element KL (mean over latent elements).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW with warm-up + cosine per step.
        scale_batches: training batches whose latents set the scaling factor at the end.
        export_dir: where under the run folder the VAE is saved (None: not saved).
    """

    def __init__(
        self,
        tiny: Mapping[str, Any] | None = None,
        source: str | None = None,
        rec_loss: str = "mse",
        kl_weight: float = 1e-4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        scale_batches: int = 32,
        export_dir: str | None = "vae",
    ) -> None:
        super().__init__()
        if (tiny is None) == (source is None):
            raise ValueError(
                "VAEModule needs exactly one of tiny= (tiny_vae kwargs, from scratch) and "
                f"source= (a VAE folder), got tiny={tiny!r}, source={source!r}"
            )
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"unknown rec_loss {rec_loss!r}: use one of {REC_LOSSES}")
        tiny = plain_hparams(tiny)  # plain values: checkpoints load weights-only
        self.save_hyperparameters()
        self.vae = tiny_vae(**tiny) if tiny is not None else load_vae(source)
        n = sum(p.numel() for p in self.vae.parameters())
        log.info("VAEModule: %.2fM parameters, latent factor %d", n / 1e6, self.factor)

    @property
    def factor(self) -> int:
        """Pixels per latent cell along a side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def losses(self, images: Tensor, sample: bool) -> dict[str, Tensor]:
        """{"rec", "kl", "loss"} of a batch (B, 3, H, W) in [-1, 1]; `sample`: decode a
        posterior sample (training) rather than the mean."""
        dist = self.vae.encode(images).latent_dist
        z = dist.sample() if sample else dist.mean
        rec = self.vae.decode(z).sample
        fn = F.mse_loss if self.hparams.rec_loss == "mse" else F.l1_loss
        out = {"rec": fn(rec, images), "kl": dist.kl().mean() / dist.mean[0].numel()}
        out["loss"] = out["rec"] + self.hparams.kl_weight * out["kl"]
        if not sample:
            out["rec_mse"] = F.mse_loss(rec.clamp(-1, 1), images)
        return out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        out = self.losses(batch["image"], sample=True)
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=bs)
        self.log("train/rec", out["rec"].detach(), batch_size=bs)
        self.log("train/kl", out["kl"].detach(), batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self.losses(batch["image"], sample=False)
        bs = batch["image"].shape[0]
        self.log("val/rec_mse", out["rec_mse"], prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/kl", out["kl"], batch_size=bs, sync_dist=True)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self.losses(batch["image"], sample=False)
        bs = batch["image"].shape[0]
        self.log("test/rec_mse", out["rec_mse"], batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(decay_groups(self.vae.parameters(), hp.weight_decay), lr=hp.lr)
        return cosine_warmup_config(
            opt, self.trainer.estimated_stepping_batches, hp.warmup_steps, hp.min_lr_ratio
        )

    # ---------------------------------------------------------------- scaling and export

    @torch.no_grad()
    def latent_std(self, batches: Sequence[Tensor] | Any, max_batches: int) -> float:
        """The standard deviation of posterior samples over up to `max_batches` image batches
        (tensors, or dicts with "image")."""
        was_training = self.vae.training
        self.vae.eval()
        total = total_sq = count = 0.0
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, Mapping) else batch
            z = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.sample()
            total += float(z.double().sum())
            total_sq += float(z.double().pow(2).sum())
            count += z.numel()
        self.vae.train(was_training)
        if count == 0:
            raise ValueError("no batches to estimate the latent scaling factor from")
        mean = total / count
        return max(total_sq / count - mean * mean, 1e-12) ** 0.5

    def on_train_end(self) -> None:
        """Set the scaling factor (1 / latent std) and save the VAE (not in fast_dev_run)."""
        folder = export_dir(self)
        if folder is None:
            return
        loader = self.trainer.datamodule.train_dataloader()
        std = self.latent_std(loader, self.hparams.scale_batches)
        self.vae.register_to_config(scaling_factor=1.0 / std)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(folder) as tmp:
            self.vae.save_pretrained(tmp)
        log.info("VAE written to %s (latent std %.3f -> scaling factor %.4f)", folder, std,
                 1.0 / std)  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        name_checkpoint(self, checkpoint)

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> VAEModule:
        """A checkpoint already read -> a new module, loaded strictly."""
        return rebuild_strict(cls, checkpoint, source, "kl_weight", **overrides)
