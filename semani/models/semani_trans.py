"""Stage 2 of SeMani-Trans: the text-to-image-token transformer as a LightningModule.

Training step (SPEC "SeMani-Trans"): images -> frozen VQGAN tokens (and grayscale tokens for the
`vg_prob` fraction of samples that get vision guidance) on the fly; `SemaniGPT` predicts text,
gray and image tokens; the loss is Eq. 9-10 (`semani.modules.trans_losses`), with the CLIP
semantic loss (Eq. 7) through a straight-through Gumbel one-hot when `lambda_sem > 0`.

Frozen parts. The VQGAN and the CLIP are submodules (they follow the model across devices) but
are frozen (`eval()`, `requires_grad_(False)`), stay in eval mode when Lightning calls
`.train()`, and never enter the optimiser. Frozen weights that can be re-read from their own
files (a taming checkpoint, our VQGAN checkpoint, a CLIP checkpoint or cached tag) are left out
of the Lightning checkpoint (`on_save_checkpoint`) and put back from the freshly loaded modules
when a checkpoint is read (`on_load_checkpoint`), so resume and `load_from_checkpoint` load
strictly. Frozen parts built at random from a config (tests) are kept in the checkpoint. A
checkpoint stores a fingerprint (`semani.utils.checkpoint.state_fingerprint`) and the source of
each frozen part it leaves out; reading it with a frozen part whose weights differ (a re-trained
VQGAN at the same path, another CLIP) is refused with `FrozenWeightsMismatchError`, naming both
sources, unless `accept_frozen_mismatch=True` is passed to `load_from_checkpoint`.

`init_ckpt` (the transformer of an earlier stage: pre-training, fine-tuning step 1) is how a run
*starts*: it is read when fitting starts, never when a checkpoint is loaded or a run resumed, so a
step-2 checkpoint opens after the step-1 file is gone. `load_from_checkpoint(path, **overrides)`
reads our checkpoints weights-only and merges `vqgan=` / `clip=` overrides into the saved specs
(`vqgan={"ckpt_path": moved_file}`), for frozen files that moved.

The VQGAN is chosen by `vqgan` (a mapping; set one of the first two, or leave both null to use
`config`):
  - `taming_ckpt` + `taming_config`: an official taming-transformers VQGAN (the paper's
    ImageNet f16, 1024 codes);
  - `ckpt_path`: one of our `VQGANModule` Lightning checkpoints (stage 1 on our data);
  - `config`: `VQGANModule` keyword arguments, random init (tests and smoke runs only).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from semani.data.transforms import to_grayscale
from semani.manipulation.sampling import sample_image_tokens
from semani.models.vqgan import VQGANModule
from semani.modules.clip import ClipModel
from semani.modules.gpt import GPTConfig, SemaniGPT
from semani.modules.trans_losses import SemaniTransLoss
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    check_overrides,
    get_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    name_checkpoint,
    plain_hparams,
    state_fingerprint,
)
from semani.utils.lr_schedule import optimizer_config
from semani.utils.text_tokens import text_padding_mask

log = logging.getLogger(__name__)

__all__ = ["FrozenWeightsMismatchError", "SemaniTransModule", "build_frozen_vqgan"]

# AdamW when no optimiser partial is given: the authors' run commands and script defaults
# (lr 5e-4, betas (0.9, 0.96), weight decay 1e-3; see configs/model/semani_trans.yaml)
DEFAULT_OPTIMIZER = functools.partial(
    torch.optim.AdamW, lr=5e-4, betas=(0.9, 0.96), weight_decay=1e-3
)
_VQGAN_KEYS = {"taming_ckpt", "taming_config", "ckpt_path", "config"}
_FROZEN_KEY = "semani_frozen_reloaded"  # checkpoint entry: prefixes whose weights were dropped
_FINGERPRINT_KEY = "semani_frozen_fingerprints"  # prefix -> {"fingerprint", "source"}
# hparams that are specs of frozen parts: overrides at load time are merged into them
_MERGED_HPARAMS = ("vqgan", "clip", "sampling")


class FrozenWeightsMismatchError(CheckpointMismatchError):
    """A frozen part re-read from its file differs from the one the checkpoint was trained with."""


def build_frozen_vqgan(spec: Mapping[str, Any] | nn.Module | None) -> tuple[VQGANModule, bool]:
    """The frozen VQGAN tokenizer from a spec (see module docstring) -> (module, reloadable).

    `reloadable` says whether the weights come from files (and may be left out of checkpoints).
    """
    if isinstance(spec, nn.Module):
        return spec.eval().requires_grad_(False), False
    spec = dict(spec or {})
    unknown = set(spec) - _VQGAN_KEYS
    if unknown:
        raise ValueError(
            f"unknown vqgan keys {sorted(unknown)}; expected some of {sorted(_VQGAN_KEYS)}"
        )
    if (spec.get("taming_ckpt") or spec.get("taming_config")) and spec.get("ckpt_path"):
        raise ValueError(
            "set either vqgan.taming_ckpt + vqgan.taming_config or vqgan.ckpt_path, not both"
        )
    if spec.get("taming_ckpt") or spec.get("taming_config"):
        if not (spec.get("taming_ckpt") and spec.get("taming_config")):
            raise ValueError("a taming VQGAN needs both vqgan.taming_ckpt and vqgan.taming_config")
        vq, reloadable = VQGANModule.from_taming(spec["taming_ckpt"], spec["taming_config"]), True
    elif spec.get("ckpt_path"):
        vq, reloadable = VQGANModule.from_checkpoint(spec["ckpt_path"]), True
    elif spec.get("config"):
        cfg = dict(spec["config"])
        cfg["loss"] = None  # frozen tokenizer: no discriminator / LPIPS
        vq, reloadable = VQGANModule(**cfg), False
        log.warning("VQGAN built from a config with RANDOM weights (tests/smoke runs only)")
    else:
        raise ValueError(
            "SemaniTransModule needs a frozen VQGAN tokenizer; set one of: "
            "model.vqgan.taming_ckpt + model.vqgan.taming_config (an official taming VQGAN), "
            "model.vqgan.ckpt_path (our VQGANModule checkpoint from stage 1), or "
            "model.vqgan.config (VQGANModule kwargs, random init: tests only)"
        )
    return vq.eval().requires_grad_(False), reloadable


def _vqgan_source(spec: Mapping[str, Any] | nn.Module | None) -> str:
    """Where the frozen VQGAN's weights come from, for messages."""
    if isinstance(spec, nn.Module):
        return "a module passed in"
    spec = spec or {}
    if spec.get("ckpt_path"):
        return str(spec["ckpt_path"])
    if spec.get("taming_ckpt"):
        return f"{spec['taming_ckpt']} (config {spec.get('taming_config')})"
    return "a random config"


def _clip_source(spec: Mapping[str, Any] | None) -> str:
    """Where the frozen CLIP's weights come from, for messages."""
    if not spec:
        return "no CLIP"
    return f"{spec.get('model_name')} from {spec.get('pretrained') or 'random init'}"


def _merge_hparams(saved: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Saved hparams updated by load-time overrides (frozen-part specs merged, see
    `SemaniTransModule.load_from_checkpoint`)."""
    check_overrides(SemaniTransModule, overrides)
    out = dict(saved)
    for key, value in overrides.items():
        old = out.get(key)
        if key in _MERGED_HPARAMS and isinstance(value, Mapping) and isinstance(old, Mapping):
            value = {**old, **plain_hparams(value)}
            if key == "vqgan" and "ckpt_path" in overrides[key] and value["ckpt_path"]:
                value["taming_ckpt"] = value["taming_config"] = None
            elif key == "vqgan" and ({"taming_ckpt", "taming_config"} & set(overrides[key])):
                value["ckpt_path"] = None
        out[key] = value
    return out


class SemaniTransModule(pl.LightningModule):
    """SeMani-Trans transformer training (Eq. 4-10).

    Args:
        gpt: `GPTConfig` or its fields as a mapping.
        vqgan: how to get the frozen VQGAN (mapping, see module docstring) or a built module.
        clip: `ClipModel` kwargs (`model_name`, `pretrained`, ...); None -> no CLIP, and then
            `lambda_sem` must be 0.
        lambda_txt, lambda_img, lambda_vg, lambda_sem: Eq. 9-10 weights (authors: 1, 7, 1, 5).
        gumbel_tau: Gumbel-softmax temperature of the straight-through estimator.
        text_loss: Eq. 5 variant, see `semani.modules.trans_losses.SemaniTransLoss`.
        vg_prob: fraction of each training batch that carries grayscale tokens (fine-tune
            step 1 and pre-training: 0.0, step 2: 0.5); exactly round(vg_prob * B) samples.
            With 0.0 the gray segment is skipped and the unused [BOV] embedding is frozen.
        sem_max_samples: compute Eq. 7 on at most this many samples per batch (memory); None=all.
        optimizer: partial optimiser (Hydra `_partial_`); its `weight_decay` goes to the >=2-D
            weights only. None: AdamW(lr 5e-4, betas (0.9, 0.96), weight_decay 1e-3).
        scheduler: partial `semani.utils.lr_schedule.warmup_plateau_schedulers` (or any callable
            optimizer -> Lightning scheduler config(s)); None: constant LR.
        sampling: `sample_image_tokens` kwargs for `log_images` (filter_thres, temperature).
    """

    def __init__(
        self,
        gpt: Mapping[str, Any] | GPTConfig,
        vqgan: Mapping[str, Any] | nn.Module | None = None,
        clip: Mapping[str, Any] | None = None,
        lambda_txt: float = 1.0,
        lambda_img: float = 7.0,
        lambda_vg: float = 1.0,
        lambda_sem: float = 5.0,
        gumbel_tau: float = 1.0,
        text_loss: str = "non_padding",
        vg_prob: float = 0.0,
        sem_max_samples: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        sampling: Mapping[str, Any] | None = None,
        init_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        gpt, clip, sampling = plain_hparams(gpt), plain_hparams(clip), plain_hparams(sampling)
        vqgan_is_module = isinstance(vqgan, nn.Module)
        if not vqgan_is_module:
            vqgan = plain_hparams(vqgan)
        if not 0.0 <= vg_prob <= 1.0:
            raise ValueError(f"vg_prob must be in [0, 1], got {vg_prob}")
        if lambda_sem > 0 and clip is None:
            raise ValueError(
                f"lambda_sem={lambda_sem} needs a CLIP for the semantic loss: set model.clip "
                "(e.g. {model_name: ViT-B-32, pretrained: <path>}) or model.lambda_sem=0"
            )
        ignore = ["optimizer", "scheduler"] + (["vqgan"] if vqgan_is_module else [])
        self.save_hyperparameters(ignore=ignore)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sampling = dict(sampling or {})

        self.gpt = SemaniGPT(GPTConfig(**gpt) if isinstance(gpt, Mapping) else gpt)
        self.vqgan, vq_reloadable = build_frozen_vqgan(vqgan)
        cfg = self.gpt.config
        if cfg.image_vocab_size != self.vqgan.n_embed:
            raise ValueError(
                f"gpt.image_vocab_size={cfg.image_vocab_size} but the VQGAN has "
                f"{self.vqgan.n_embed} codes: set model.gpt.image_vocab_size={self.vqgan.n_embed}"
            )
        if text_loss == "all_positions" and not cfg.text_pad_targets:
            raise ValueError(
                "text_loss='all_positions' (the authors' loss) predicts a pad class per text "
                "position: set model.gpt.text_pad_targets=true, or model.text_loss=non_padding"
            )
        self.clip: ClipModel | None = None
        clip_reloadable = False
        if clip is not None and lambda_sem > 0:
            self.clip = ClipModel(**clip)
            clip_reloadable = bool(clip.get("pretrained"))
        self._reloadable = [
            p for p, ok in (("vqgan.", vq_reloadable), ("clip.", clip_reloadable)) if ok
        ]
        self.init_ckpt = init_ckpt  # read in `on_fit_start`, never at load time
        self.accept_frozen_mismatch = False  # set by load_from_checkpoint(accept_...=True)
        self._frozen_sources = {"vqgan.": _vqgan_source(vqgan), "clip.": _clip_source(clip)}
        self._fingerprints: dict[str, str] = {}  # frozen parts never change: hash them once
        if vg_prob == 0:  # no gray segment, so [BOV] gets no gradient: freeze it (DDP-safe)
            self.gpt.bov.requires_grad_(False)
        self.criterion = SemaniTransLoss(
            lambda_txt, lambda_img, lambda_vg, lambda_sem, gumbel_tau, text_loss=text_loss,
            text_vocab_size=self.gpt.config.text_vocab_size,
        )  # fmt: skip
        self.vg_prob = vg_prob
        self.sem_max_samples = sem_max_samples
        log.info(
            "SemaniTransModule: GPT %.1fM trainable parameters; frozen VQGAN (%d codes)%s",
            self.gpt.get_num_params() / 1e6, self.vqgan.n_embed,
            f", frozen CLIP {self.clip.model_name}" if self.clip is not None else "",
        )  # fmt: skip

    def on_fit_start(self) -> None:
        """Start from `init_ckpt`, unless this fit resumes a checkpoint (it has newer weights)."""
        if self.init_ckpt and not self.trainer.ckpt_path:
            self.init_transformer_from(self.init_ckpt)
        elif self.init_ckpt:
            log.info("resuming %s: init_ckpt is not read", self.trainer.ckpt_path)

    def init_transformer_from(self, path: str) -> None:
        """Start from the transformer weights of an earlier stage (pre-training, fine-tune step 1).

        Only `gpt.*` is read (strictly); optimizer, scheduler and step counter start afresh. To
        continue an interrupted run with its optimizer state, use `ckpt_path=` instead.
        """
        ckpt = load_checkpoint(path)
        state = get_state_dict(ckpt, source=str(path))
        gpt_state = {k[4:]: v for k, v in state.items() if k.startswith("gpt.")}
        if not gpt_state:
            raise CheckpointMismatchError(
                f"init_ckpt={path} holds no 'gpt.*' weights: it is not a SemaniTransModule "
                "checkpoint (pass the last.ckpt of a SeMani-Trans pre-training or step-1 run)"
            )
        load_state_dict_strict(self.gpt, gpt_state, source=str(path), expected="SemaniGPT")
        log.info("Initialised the transformer from %s (%d tensors)", path, len(gpt_state))

    # ---------------------------------------------------------------- frozen parts

    def train(self, mode: bool = True) -> SemaniTransModule:
        """Train mode for the transformer only; the frozen VQGAN and CLIP stay in eval mode."""
        super().train(mode)
        self.vqgan.eval()
        if self.clip is not None:
            self.clip.eval()
        return self

    def frozen_fingerprint(self, prefix: str) -> str:
        """`state_fingerprint` of the frozen part under `prefix` ("vqgan." or "clip.")."""
        if prefix not in self._fingerprints:
            self._fingerprints[prefix] = state_fingerprint(getattr(self, prefix.rstrip(".")))
        return self._fingerprints[prefix]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave out frozen weights that can be re-read from their own files; store their
        fingerprints and sources, and the class that wrote the checkpoint."""
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(tuple(self._reloadable))]:
            del sd[key]
        checkpoint[_FROZEN_KEY] = list(self._reloadable)
        checkpoint[_FINGERPRINT_KEY] = {
            p: {"fingerprint": self.frozen_fingerprint(p), "source": self._frozen_sources[p]}
            for p in self._reloadable
        }
        name_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the frozen parts against the checkpoint's fingerprints, then put their weights
        (already loaded from their files) back for a strict load."""
        sd, prefixes = checkpoint["state_dict"], tuple(checkpoint.get(_FROZEN_KEY, []))
        if not prefixes:
            return
        self._check_fingerprints(checkpoint.get(_FINGERPRINT_KEY), prefixes)
        own = {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}
        missing = {k: v for k, v in own.items() if k not in sd}
        sd.update(missing)
        log.info("checkpoint: %d frozen tensors (%s) taken from their own files",
                 len(missing), ", ".join(p.rstrip(".") for p in prefixes))  # fmt: skip

    def _check_fingerprints(
        self, saved: Mapping[str, Any] | None, prefixes: Sequence[str]
    ) -> None:
        if saved is None:  # written before fingerprints existed
            log.warning(
                "checkpoint has no fingerprints of its frozen %s: cannot check that they are the "
                "weights it was trained with",
                ", ".join(p.rstrip(".") for p in prefixes),
            )
            return
        for prefix in prefixes:
            if prefix not in saved:
                continue
            want, now = saved[prefix]["fingerprint"], self.frozen_fingerprint(prefix)
            if want == now:
                continue
            part = prefix.rstrip(".")
            message = (
                f"the frozen {part} differs from the one this checkpoint was trained with: "
                f"trained with {saved[prefix]['source']} (fingerprint {want}), now loaded from "
                f"{self._frozen_sources[prefix]} (fingerprint {now}). Point {part}= at the "
                "original file (load_from_checkpoint(path, "
                f"{part}={{...}}) / semani.load_model(path, {part}={{...}})), or pass "
                "accept_frozen_mismatch=True to use these weights anyway"
            )
            if not self.accept_frozen_mismatch:
                raise FrozenWeightsMismatchError(message)
            log.warning("accept_frozen_mismatch=True: %s", message)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        accept_frozen_mismatch: bool = False,
        **overrides: Any,
    ) -> SemaniTransModule:
        """Read one of our checkpoints (weights-only) into a new module, strictly.

        `overrides` replace saved hyper-parameters; for `vqgan`, `clip` and `sampling` they are
        merged into the saved mapping (`vqgan={"ckpt_path": new}` points at a moved frozen
        VQGAN and drops the saved taming paths, and the other way round). `init_ckpt` is never
        read. `map_location` moves the module after loading; `hparams_file` is not supported;
        `strict=False` is refused (our checkpoints load strictly); `weights_only` is accepted
        for Lightning compatibility (reading is always weights-only).
        """
        if hparams_file is not None:
            raise ValueError("hparams_file is not supported: our checkpoints carry their hparams")
        if strict is False:
            raise ValueError("strict=False is not supported: our checkpoints load strictly")
        return cls.from_checkpoint_dict(
            load_checkpoint(checkpoint_path), str(checkpoint_path), map_location,
            accept_frozen_mismatch, **overrides,
        )  # fmt: skip

    @classmethod
    def from_checkpoint_dict(
        cls,
        checkpoint: dict[str, Any],
        source: str,
        map_location: Any = None,
        accept_frozen_mismatch: bool = False,
        **overrides: Any,
    ) -> SemaniTransModule:
        """`load_from_checkpoint` for a checkpoint already read (see there)."""
        saved = checkpoint.get("hyper_parameters")
        if not isinstance(saved, Mapping) or "gpt" not in saved:
            raise CheckpointMismatchError(
                f"checkpoint '{source}' is not a SemaniTransModule checkpoint (its "
                f"hyper_parameters have no 'gpt'); use semani.load_model for any of our models"
            )
        hparams = _merge_hparams(dict(saved), overrides)
        model = cls(**hparams)
        model.accept_frozen_mismatch = accept_frozen_mismatch
        model.on_load_checkpoint(checkpoint)
        load_state_dict_strict(
            model, get_state_dict(checkpoint, source), source, expected="a SemaniTransModule"
        )
        log.info("loaded SemaniTransModule from %s", source)
        return model.to(map_location) if map_location is not None else model

    # ---------------------------------------------------------------- tokens

    @torch.no_grad()
    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> VQGAN tokens (B, h, w), computed in float32."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.vqgan.encode_to_tokens(images.float())

    @torch.no_grad()
    def gray_tokens(self, images: Tensor, use_gray: Tensor) -> Tensor:
        """VQGAN tokens (B, h*w) of the grayscale images where `use_gray`, 0 elsewhere."""
        B = images.shape[0]
        cfg = self.gpt.config
        gray = torch.zeros(B, cfg.image_len, dtype=torch.long, device=images.device)
        if bool(use_gray.any()):
            g = to_grayscale(images[use_gray])  # (b, 3, H, W)
            gray[use_gray] = self.image_tokens(g).flatten(1)
        return gray

    def choose_gray(self, batch_size: int, device: torch.device) -> Tensor | None:
        """(B,) bool with exactly round(vg_prob * B) (>= 1) True entries; None if vg_prob=0."""
        if self.vg_prob <= 0:
            return None
        k = min(batch_size, max(1, round(self.vg_prob * batch_size)))
        use = torch.zeros(batch_size, dtype=torch.bool, device=device)
        use[torch.randperm(batch_size, device=device)[:k]] = True
        return use

    # ---------------------------------------------------------------- steps

    def _losses(
        self, batch: Mapping[str, Any], use_gray: Tensor | None, noise: bool, sem: bool = True
    ) -> dict[str, Tensor]:
        """All loss terms of a batch; `use_gray` (B,) picks the guided samples (None: none),
        `noise` the Gumbel noise of Eq. 7, `sem=False` skips Eq. 7."""
        images, text = batch["image"], batch["tokens"]
        if text.shape[1] != self.gpt.config.text_len:
            raise ValueError(
                f"the batch has {text.shape[1]} text tokens per caption but gpt.text_len="
                f"{self.gpt.config.text_len}: set data.context_length={self.gpt.config.text_len}"
            )
        tokens = self.image_tokens(images)  # (B, h, w)
        B, h, w = tokens.shape
        if h * w != self.gpt.config.image_len:
            raise ValueError(
                f"the VQGAN turns {tuple(images.shape[-2:])} images into {h}x{w} = {h * w} "
                f"tokens but gpt.image_len={self.gpt.config.image_len}: match the data "
                "image_size and the model config"
            )
        image = tokens.flatten(1)  # (B, Li)
        gray = self.gray_tokens(images, use_gray) if use_gray is not None else None
        out = self.gpt(text, image, gray, use_gray)
        pad = text_padding_mask(text, self.gpt.config.text_eot_token)  # (B, Lt)
        sem_text: Sequence[str] | Tensor = batch.get("caption", text)
        return self.criterion(
            out.text_logits, out.image_logits, out.gray_logits, text, image, pad,
            gray=gray, use_gray=use_gray, sem_text=sem_text,
            vqgan=self.vqgan if sem else None, clip=self.clip if sem else None, grid=(h, w),
            sem_noise=noise, sem_max_samples=self.sem_max_samples,
        )  # fmt: skip

    def _log(
        self, stage: str, losses: Mapping[str, Tensor], batch_size: int, suffix: str = ""
    ) -> None:
        train = stage == "train"
        for name, value in losses.items():
            self.log(
                f"{stage}/{name}{suffix}", value.detach(), on_step=train, on_epoch=True,
                prog_bar=name == "loss", sync_dist=not train, batch_size=batch_size,
            )  # fmt: skip

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        B = batch["image"].shape[0]
        losses = self._losses(batch, self.choose_gray(B, batch["image"].device), noise=True)
        self._log("train", losses, B)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Held-out losses without guidance (`val/*`) and, when training uses vision guidance,
        the image and gray losses with every sample guided (`val/loss_img_guided`,
        `val/loss_vg_guided`). The semantic loss uses the argmax one-hot (no Gumbel noise)."""
        self._eval_step("val", batch, guided=self.vg_prob > 0)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """As `validation_step` on the test split (`test/*`), always with the guided losses
        (`test/loss_img_guided`, `test/loss_vg_guided`) too."""
        self._eval_step("test", batch, guided=True)

    def _eval_step(self, stage: str, batch: Mapping[str, Any], guided: bool) -> None:
        B = batch["image"].shape[0]
        losses = self._losses(batch, None, noise=False)
        losses.pop("loss_vg")
        self._log(stage, losses, B)
        if guided:
            use = torch.ones(B, dtype=torch.bool, device=batch["image"].device)
            out = self._losses(batch, use, noise=False, sem=False)
            self._log(stage, {k: out[k] for k in ("loss_img", "loss_vg")}, B, suffix="_guided")

    # ---------------------------------------------------------------- optimisation

    def configure_optimizers(self) -> Any:
        """AdamW over the transformer only; weight decay on >=2-D weights; warm-up + plateau."""
        factory = self.optimizer_factory or DEFAULT_OPTIMIZER
        wd = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = factory(params=self.gpt.configure_optimizer_groups(wd))
        return optimizer_config(optimizer, self.scheduler_factory)

    # ---------------------------------------------------------------- images

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], max_images: int = 4, sample: bool = True, **kwargs: Any
    ) -> dict[str, Tensor]:
        """`inputs`, VQGAN `reconstructions` and, with `sample`, `samples` drawn from the
        caption (plus `samples_guided` from the grayscale tokens when vg_prob > 0); each
        (N, 3, H, W) in [-1, 1]. kwargs override `sampling` (filter_thres, temperature, ...)."""
        x = batch["image"][:max_images].to(self.device)
        text = batch["tokens"][:max_images].to(self.device)
        tokens = self.image_tokens(x)  # (N, h, w)
        N, h, w = tokens.shape
        out = {"inputs": x, "reconstructions": self.vqgan.decode_tokens(tokens).clamp(-1, 1)}
        if sample:
            kw = {**self.sampling, **kwargs}
            s = sample_image_tokens(self.gpt, text, **kw)  # (N, Li)
            out["samples"] = self.vqgan.decode_tokens(s.view(N, h, w)).clamp(-1, 1)
            if self.vg_prob > 0:
                use = torch.ones(N, dtype=torch.bool, device=self.device)
                gray = self.gray_tokens(x, use)  # (N, Li)
                s = sample_image_tokens(self.gpt, text, gray=gray, use_gray=use, **kw)
                out["samples_guided"] = self.vqgan.decode_tokens(s.view(N, h, w)).clamp(-1, 1)
        return out
