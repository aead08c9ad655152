"""VQGAN training loss: L1 (+ LPIPS) reconstruction, codebook, adaptive-weight PatchGAN.

The same objective as taming's ``VQLPIPSWithDiscriminator`` (its discriminator, init, GAN losses,
``adopt_weight`` and adaptive weight are reused), with two differences: LPIPS is only built when
``perceptual_weight > 0``, and its weights are read from local files (never downloaded); a missing
file raises an error naming where it goes. Submodule names (``discriminator``,
``perceptual_loss``) match taming's, so ``loss.*`` state-dict keys move between the codebases.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
from taming.modules.losses.lpips import LPIPS
from taming.modules.losses.vqperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss
from taming.util import CKPT_MAP, URL_MAP
from torch import Tensor, nn
from torchvision.models import VGG16_Weights

log = logging.getLogger(__name__)

# Where taming's LPIPS looks for its linear layers: relative to the working directory.
TAMING_LPIPS_DIR = "taming/modules/autoencoder/lpips"


def vgg16_weights_path() -> Path:
    """Where torchvision looks for the ImageNet VGG-16 weights: ``$TORCH_HOME/hub/checkpoints``."""
    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def lpips_lin_path(lpips_ckpt: str | os.PathLike | None) -> Path:
    """The LPIPS linear-layer file: ``lpips_ckpt`` or taming's default (cwd-relative) path."""
    if lpips_ckpt is not None:
        return Path(lpips_ckpt)
    return Path(TAMING_LPIPS_DIR) / CKPT_MAP["vgg_lpips"]


class LocalLPIPS(LPIPS):
    """taming's LPIPS (VGG-16 features + learned linear heads) built only from local files."""

    def __init__(self, lpips_ckpt: str | os.PathLike | None = None) -> None:
        lin_path, vgg_path = lpips_lin_path(lpips_ckpt), vgg16_weights_path()
        missing = [p for p in (lin_path, vgg_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                "perceptual_weight > 0 needs the LPIPS weights, which cannot be downloaded here. "
                f"Missing: {', '.join(str(p.resolve()) for p in missing)}. Put (1) the LPIPS "
                f"linear layers 'vgg.pth' (from {URL_MAP['vgg_lpips']}, md5 "
                f"d507d7349b931f0638a25a48a722f98a) at '{lin_path.resolve()}' (set "
                "model.loss.lpips_ckpt=/path/to/vgg.pth to use another place; the default is "
                f"taming's '{TAMING_LPIPS_DIR}/vgg.pth' relative to the working directory), and "
                "(2) torchvision's VGG-16 ImageNet weights "
                f"({VGG16_Weights.IMAGENET1K_V1.url}) at "
                f"'{vgg_path}' ($TORCH_HOME/hub/checkpoints/). Or set "
                "model.loss.perceptual_weight=0 to train without LPIPS."
            )
        super().__init__()  # torchvision reads the VGG-16 weights from its hub cache
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        expected = {k for k in self.state_dict() if k.startswith("lin")}
        if not isinstance(lin, dict) or set(lin) != expected:
            got = sorted(lin)[:5] if isinstance(lin, dict) else type(lin).__name__
            raise ValueError(
                f"'{lin_path}' is not an LPIPS-VGG linear-layer file: expected keys "
                f"{sorted(expected)}, got {got}"
            )
        self.load_state_dict(lin, strict=False)  # the VGG part came from torchvision above
        self.requires_grad_(False)
        log.info("LPIPS: linear layers from %s, VGG-16 from %s", lin_path, vgg16_weights_path())

    def load_from_pretrained(self, name: str = "vgg_lpips") -> None:
        """No-op: taming would download here; the weights are loaded in ``__init__``."""


class VQGANLoss(nn.Module):
    """Taming's VQGAN objective (``VQLPIPSWithDiscriminator``) as two explicit passes.

    Args are taming's ``lossconfig.params`` plus ``lpips_ckpt`` (path of LPIPS's ``vgg.pth``).
    ``disc_start`` is counted in training batches (the ``step`` passed to the two passes).
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        lpips_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got '{disc_loss}'")
        if disc_conditional:
            raise NotImplementedError(
                "disc_conditional=True (taming's cond input) is not supported"
            )
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight  # stored but unused, as in taming
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = LocalLPIPS(lpips_ckpt).eval() if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels,
            n_layers=disc_num_layers,
            use_actnorm=use_actnorm,
            ndf=disc_ndf,
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight

    def calculate_adaptive_weight(
        self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor
    ) -> Tensor:
        """Adaptive GAN weight: ||grad nll|| / (||grad g_loss|| + 1e-4), clamped, * disc_weight.

        Gradients are taken at ``last_layer`` (the decoder's last weight).
        """
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def reconstruction_loss(
        self, inputs: Tensor, reconstructions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-pixel L1 + perceptual_weight * LPIPS -> (rec_loss (B,C,H,W), p_loss (B,1,1,1))."""
        rec_loss = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=inputs.device)
        return rec_loss, p_loss

    def generator_loss(
        self,
        codebook_loss: Tensor,
        inputs: Tensor,
        reconstructions: Tensor,
        step: int,
        last_layer: Tensor | None = None,
        split: str = "train",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder objective: nll + lambda * disc_factor * g_loss + codebook_weight * q_loss.

        ``last_layer`` (the decoder's last weight) enables the adaptive weight lambda; without it
        (e.g. validation under no_grad) lambda is 0, as in taming.
        """
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss.mean()
        disc_factor = adopt_weight(self.disc_factor, step, threshold=self.discriminator_iter_start)
        zero = torch.zeros((), device=inputs.device)
        if disc_factor > 0:
            logits_fake = self.discriminator(reconstructions.contiguous())
            g_loss = -torch.mean(logits_fake)
            use_grad = last_layer is not None and torch.is_grad_enabled()
            d_weight = (
                self.calculate_adaptive_weight(nll_loss, g_loss, last_layer) if use_grad else zero
            )
        else:  # before disc_start taming's GAN term is multiplied by 0: skip computing it
            g_loss, d_weight = zero, zero
        loss = (
            nll_loss
            + d_weight * disc_factor * g_loss
            + self.codebook_weight * codebook_loss.mean()
        )
        logs = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, step: int, split: str = "train"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator objective ``disc_factor * hinge(D(x), D(x_rec))`` on detached images.

        Computed (times 0) before ``disc_start`` too, as in taming, so the optimiser always has
        gradients (AMP's GradScaler needs them) and Adam's step count matches taming's.
        """
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = adopt_weight(self.disc_factor, step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        logs = {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
