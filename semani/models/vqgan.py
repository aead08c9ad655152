"""Stage 1 of SeMani-Trans: the VQGAN (taming-transformers' ``VQModel``) as a Lightning 2 module.

Attribute names are taming's (``encoder``, ``decoder``, ``quantize``, ``quant_conv``,
``post_quant_conv``, ``loss``), so an official taming ``state_dict`` loads strictly.

Training uses manual optimisation with two Adam optimisers (autoencoder, discriminator), both
stepped on every batch, so ``trainer.global_step`` (which counts optimiser steps) grows by 2 per
batch. The loss schedule (``disc_start``) is in batches, as in taming (PL 1.0 counted batches):
``batch step = global_step // 2``.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import Tensor, nn

from semani.modules.conv_autoencoder import ConvDecoder, ConvEncoder
from semani.modules.vqgan_loss import VQGANLoss
from semani.utils.checkpoint import (
    get_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    plain_hparams,
)

log = logging.getLogger(__name__)

# Lightning (2.5+) warns at every step-based checkpoint of a manual-optimisation module that it
# holds the weights AFTER the optimiser steps, with a page of example code for stashing the
# pre-step weights (which it restores only for a module with a `.layer`). After the steps is what
# this module wants: weights, optimiser states and global_step agree, so a resume is exact.
warnings.filterwarnings(
    "ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning
)

TAMING_VQMODEL = "taming.models.vqgan.VQModel"
TAMING_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
# constructor args stored as hparams (plain values, so checkpoints load weights-only)
_HPARAMS = (
    "ddconfig",
    "n_embed",
    "embed_dim",
    "loss",
    "learning_rate",
    "beta",
    "legacy",
    "image_key",
    "restart_dead_codes",
    "arch",
    "betas",
)
# encoder/decoder classes per `arch`
ARCHS = {"taming": (Encoder, Decoder), "conv": (ConvEncoder, ConvDecoder)}


def _drop_loss_keys(sd: dict[str, Tensor], source: str | os.PathLike) -> dict[str, Tensor]:
    """Remove the training-loss weights (``loss.*``) by name, logging what went."""
    dropped = sorted(k for k in sd if k.startswith("loss."))
    if dropped:
        prefixes = sorted({".".join(k.split(".")[:2]) for k in dropped})
        log.info(
            "%s: dropped %d loss.* keys (%s); the training loss is not built",
            source,
            len(dropped),
            ", ".join(prefixes),
        )
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


class VQGANModule(pl.LightningModule):
    """VQGAN autoencoder: E -> quant_conv -> VQ (Eq. 3) -> post_quant_conv -> G.

    Args:
        ddconfig: taming's Encoder/Decoder config (``ch``, ``ch_mult``, ``z_channels``, ...).
        n_embed: codebook size K.
        embed_dim: codebook vector size.
        loss: ``VQGANLoss`` kwargs (taming's ``lossconfig.params`` + ``lpips_ckpt``); ``None``
            builds an inference-only model (no discriminator / LPIPS, cannot train).
        learning_rate: Adam lr of both optimisers (taming's ``base_learning_rate``; taming's
            ``main.py`` multiplied it by batch size x GPUs x accumulation, we do not).
        beta: commitment weight of the quantizer (taming: 0.25).
        legacy: taming's ``VectorQuantizer2(legacy=True)`` puts beta on the codebook term
            (the "buggy" default that the official checkpoints were trained with).
        image_key: key of the images in a batch dict.
        restart_dead_codes: every this many training batches, codes that no token used since
            the last check are reset to random encoder outputs of the current batch (the
            "random restart" of Jukebox, Dhariwal et al. 2020); 0 (taming's behaviour) = never.
            Small codebooks trained briefly (ShapesWorld) otherwise collapse onto a few codes.
        arch: ``"taming"`` (taming's ``Encoder``/``Decoder``, every released VQGAN) or
            ``"conv"`` (:mod:`semani.modules.conv_autoencoder`, a plain conv net that trains
            ~25x faster on a CPU, for ShapesWorld); both read ``ddconfig``.
        betas: Adam betas of both optimisers (taming: (0.5, 0.9)).
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        loss: Mapping[str, Any] | None = None,
        learning_rate: float = 4.5e-6,
        beta: float = 0.25,
        legacy: bool = True,
        image_key: str = "image",
        restart_dead_codes: int = 0,
        arch: str = "taming",
        betas: Sequence[float] = (0.5, 0.9),
    ) -> None:
        super().__init__()
        ddconfig, loss = plain_hparams(ddconfig), plain_hparams(loss)
        if arch not in ARCHS:
            raise ValueError(f"unknown VQGAN arch {arch!r}: use one of {sorted(ARCHS)}")
        if ddconfig.get("double_z", True):
            raise ValueError(
                "a VQGAN needs ddconfig.double_z=false (taming's Encoder default is true)"
            )
        values = (
            ddconfig, n_embed, embed_dim, loss, learning_rate, beta, legacy, image_key,
            int(restart_dead_codes), arch, [float(b) for b in betas],
        )  # fmt: skip
        self.save_hyperparameters(dict(zip(_HPARAMS, values)))
        self.automatic_optimization = False
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.downsample_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)  # image px per token
        self.learning_rate = float(learning_rate)
        self.image_key = image_key

        encoder_cls, decoder_cls = ARCHS[arch]
        self.encoder = encoder_cls(**ddconfig)
        self.decoder = decoder_cls(**ddconfig)
        self.loss = VQGANLoss(**loss) if loss is not None else None
        self.quantize = VectorQuantizer2(
            self.n_embed,
            self.embed_dim,
            beta=beta,
            remap=None,
            sane_index_shape=True,
            legacy=legacy,
        )
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, ddconfig["z_channels"], 1)
        self.restart_dead_codes = int(restart_dead_codes)
        # tokens per code since the last restart check (not saved: official keys stay strict)
        self.register_buffer("code_usage", torch.zeros(self.n_embed), persistent=False)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_taming(
        cls,
        ckpt_path: str | os.PathLike,
        config_path: str | os.PathLike,
        with_loss: bool = False,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> VQGANModule:
        """Load an official taming VQGAN (``last.ckpt`` + its ``model.yaml``) strictly.

        Without ``with_loss`` the ``loss.*`` weights (discriminator, LPIPS) are dropped by name.
        ``checkpoint``: ``ckpt_path`` already read (then it is not read again).
        """
        config_path = Path(config_path)
        if not config_path.is_file():
            raise FileNotFoundError(f"taming config not found: '{config_path}'")
        cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
        model_cfg = cfg.get("model", {}) if isinstance(cfg, dict) else {}
        if model_cfg.get("target") != TAMING_VQMODEL:
            raise ValueError(
                f"'{config_path}': model.target is {model_cfg.get('target')!r}, expected "
                f"'{TAMING_VQMODEL}' (a taming VQGAN config with model.params.ddconfig/...)"
            )
        params = model_cfg.get("params", {})
        if params.get("remap") is not None:
            raise NotImplementedError(
                f"'{config_path}': quantizer index remapping is not supported"
            )
        loss = None
        if with_loss:
            lossconfig = params.get("lossconfig", {})
            if lossconfig.get("target") != TAMING_LOSS:
                raise ValueError(f"'{config_path}': lossconfig.target must be '{TAMING_LOSS}'")
            loss = lossconfig.get("params", {})
        model = cls(
            ddconfig=params["ddconfig"],
            n_embed=params["n_embed"],
            embed_dim=params["embed_dim"],
            loss=loss,
            learning_rate=model_cfg.get("base_learning_rate", 4.5e-6),
        )
        ckpt = checkpoint if checkpoint is not None else load_checkpoint(ckpt_path)
        sd = get_state_dict(ckpt, ckpt_path)
        if not with_loss:
            sd = _drop_loss_keys(sd, ckpt_path)
        load_state_dict_strict(model, sd, str(ckpt_path), expected="a taming VQModel state_dict")
        log.info("loaded taming VQGAN from %s (config %s)", ckpt_path, config_path)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, with_loss: bool = False) -> VQGANModule:
        """Load one of our own Lightning checkpoints (hparams + state_dict) strictly."""
        return cls.from_checkpoint_dict(load_checkpoint(path), str(path), with_loss=with_loss)

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> VQGANModule:
        """A checkpoint already read -> a new module, loaded strictly (`semani.load_model`).

        Overrides: ``with_loss=True`` keeps the discriminator / LPIPS weights;
        ``config=<model.yaml>`` reads ``checkpoint`` as an official taming one (``from_taming``).
        """
        config = overrides.pop("config", None)
        unknown = sorted(overrides.keys() - {"with_loss"})
        if unknown:
            raise TypeError(
                f"unknown VQGAN overrides {unknown}; known: with_loss (and "
                "config=<taming model.yaml> for an official taming checkpoint)"
            )
        with_loss = overrides.get("with_loss", False)
        if config is not None:
            return cls.from_taming(source, config, with_loss, checkpoint=checkpoint)
        hp = checkpoint.get("hyper_parameters")
        if not isinstance(hp, Mapping):
            raise KeyError(
                f"checkpoint '{source}' has no 'hyper_parameters' (top-level keys: "
                f"{sorted(checkpoint)[:8]}); for an official taming checkpoint use "
                "VQGANModule.from_taming(ckpt_path, config_path) or semani.load_model(path, "
                "config=<its model.yaml>)"
            )
        required, unknown = {"ddconfig", "n_embed", "embed_dim"} - set(hp), set(hp) - set(_HPARAMS)
        if required or unknown:
            raise KeyError(
                f"checkpoint '{source}' is not a VQGANModule checkpoint: its hyper_parameters "
                f"lack {sorted(required)} and have unexpected {sorted(unknown)[:5]}; expected "
                f"{list(_HPARAMS)}"
            )
        hp = dict(hp)
        sd = get_state_dict(checkpoint, source)
        if not with_loss:
            hp["loss"], sd = None, _drop_loss_keys(sd, source)
        model = cls(**hp)
        load_state_dict_strict(model, sd, source, expected="a VQGANModule state_dict")
        log.info("loaded VQGAN from %s", source)
        return model

    # ----------------------------------------------------------------------------- model
    def get_input(self, batch: Mapping[str, Any] | Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] from a batch dict (``image_key``) or a tensor."""
        x = batch[self.image_key] if isinstance(batch, Mapping) else batch
        c = self.hparams.ddconfig["in_channels"]
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {shape}")
        return x.to(memory_format=torch.contiguous_format).float()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B,3,H,W) -> z_q (B,e,h,w) (straight-through), codebook loss (), tokens (B,h,w)."""
        h = self.quant_conv(self.encoder(x))  # (B, e, h, w)
        z_q, qloss, (_, _, tokens) = self.quantize(h)
        return z_q, qloss, tokens

    def decode(self, z_q: Tensor) -> Tensor:
        """z_q (B,e,h,w) -> images (B,3,H,W)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,3,H,W) -> (reconstruction (B,3,H,W), codebook loss ())."""
        z_q, qloss, _ = self.encode(x)
        return self.decode(z_q), qloss

    @torch.no_grad()
    def encode_to_tokens(self, images: Tensor) -> Tensor:
        """images (B,3,H,W) in [-1,1] -> codebook indices (B, H/f, W/f) long."""
        return self.encode(self.get_input(images))[2]

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B,h,w) long -> images (B,3,h*f,w*f)."""
        if tokens.ndim != 3 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"expected integer tokens (B, h, w), got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.n_embed):
            raise ValueError(
                f"tokens must lie in [0, {self.n_embed}), got [{tokens.min()}, {tokens.max()}]"
            )
        b, h, w = tokens.shape
        z_q = self.quantize.get_codebook_entry(tokens.reshape(-1), shape=(b, h, w, self.embed_dim))
        return self.decode(z_q)  # z_q: (B, e, h, w)

    def embed_onehot(self, onehot: Tensor) -> Tensor:
        """onehot (B,h,w,K) -> z_q (B,e,h,w) = onehot @ codebook; differentiable in ``onehot``."""
        if onehot.ndim != 4 or onehot.shape[-1] != self.n_embed:
            raise ValueError(f"expected (B, h, w, {self.n_embed}), got {tuple(onehot.shape)}")
        codebook = self.quantize.embedding.weight  # (K, e)
        z_q = onehot.to(codebook.dtype) @ codebook  # (B, h, w, e)
        return z_q.permute(0, 3, 1, 2).contiguous()  # (B, e, h, w)

    def get_last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any] | Tensor, max_images: int | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        """{"inputs": x, "reconstructions": x_rec}, each (N,3,H,W) in [-1, 1] (rec unclamped)."""
        x = self.get_input(batch)[:max_images].to(self.device)
        return {"inputs": x, "reconstructions": self(x)[0]}

    # ----------------------------------------------------------------------------- training
    def _require_loss(self) -> VQGANLoss:
        if self.loss is None:
            raise RuntimeError(
                "this VQGANModule was built without a loss (inference only: loss=None, or loaded "
                "with with_loss=False); build it with a `loss` config to train"
            )
        return self.loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss_fn = self._require_loss()
        opt_ae, opt_disc = self.optimizers()
        step = self.global_step // 2  # batches trained so far: each batch steps both optimisers
        x = self.get_input(batch)
        h = self.quant_conv(self.encoder(x))  # (B, e, h, w)
        z_q, qloss, (_, _, tokens) = self.quantize(h)
        xrec = self.decode(z_q)
        if self.restart_dead_codes:
            self._restart_dead_codes(h.detach(), tokens, step)

        with self.toggled_optimizer(opt_ae):  # autoencoder (generator) update
            aeloss, log_ae = loss_fn.generator_loss(
                qloss, x, xrec, step, last_layer=self.get_last_layer(), split="train"
            )
            opt_ae.zero_grad(set_to_none=True)
            self.manual_backward(aeloss)
            opt_ae.step()

        with self.toggled_optimizer(opt_disc):  # discriminator update on detached images
            discloss, log_disc = loss_fn.discriminator_loss(x, xrec.detach(), step, split="train")
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(discloss)
            opt_disc.step()

        bs = x.shape[0]
        self.log(
            "train/aeloss",
            aeloss.detach(),
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=bs,
        )
        self.log(
            "train/discloss",
            discloss.detach(),
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=bs,
        )
        self.log_dict({**log_ae, **log_disc}, on_step=True, on_epoch=True, batch_size=bs)

    @torch.no_grad()
    def _restart_dead_codes(self, h: Tensor, tokens: Tensor, step: int) -> None:
        """Count code usage; every ``restart_dead_codes`` batches reset unused codes."""
        self.code_usage += torch.bincount(tokens.flatten(), minlength=self.n_embed)
        if (step + 1) % self.restart_dead_codes:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.code_usage)
        dead = self.code_usage == 0  # (K,)
        n_dead = int(dead.sum())
        if n_dead:
            z = h.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)  # (B*h*w, e)
            pick = torch.randint(len(z), (n_dead,), device=z.device)
            codebook = self.quantize.embedding.weight  # (K, e)
            codebook[dead] = z[pick].to(codebook.dtype)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(codebook, src=0)  # every rank keeps one codebook
        self.log("train/dead_codes", float(n_dead), on_step=True, on_epoch=False)
        self.code_usage.zero_()

    def _eval_step(self, batch: Mapping[str, Any], split: str) -> None:
        """Losses on a held-out batch, logged per epoch as ``{split}/rec_loss`` etc."""
        x = self.get_input(batch)
        xrec, qloss = self(x)
        bs = x.shape[0]
        if self.loss is None:  # inference-only model: report the L1 reconstruction error
            rec = torch.abs(x - xrec).mean()
            self.log(f"{split}/rec_loss", rec, prog_bar=True, sync_dist=True, batch_size=bs)
            return
        step = self.global_step // 2
        aeloss, log_ae = self.loss.generator_loss(
            qloss, x, xrec, step, last_layer=None, split=split
        )
        discloss, log_disc = self.loss.discriminator_loss(x, xrec, step, split=split)
        rec_loss = log_ae.pop(f"{split}/rec_loss")
        self.log(f"{split}/rec_loss", rec_loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log(f"{split}/aeloss", aeloss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log_dict({**log_ae, **log_disc}, sync_dist=True, batch_size=bs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[Adam(autoencoder), Adam(discriminator)], lr = learning_rate, betas = ``betas``."""
        loss_fn = self._require_loss()
        ae_params = itertools.chain(
            self.encoder.parameters(),
            self.decoder.parameters(),
            self.quantize.parameters(),
            self.quant_conv.parameters(),
            self.post_quant_conv.parameters(),
        )
        betas = tuple(self.hparams.betas)
        opt_ae = torch.optim.Adam(ae_params, lr=self.learning_rate, betas=betas)
        opt_disc = torch.optim.Adam(
            loss_fn.discriminator.parameters(), lr=self.learning_rate, betas=betas
        )
        return [opt_ae, opt_disc]
