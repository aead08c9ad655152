"""The parts of `SemaniDiffModule` that are not the training step: its diffusers components
(`build_components`, `replace_vae`), the regression target of a scheduler, seeded generators,
8-bit AdamW, and an EMA of the UNet that can be swapped into it (`SwappableEMA`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from semani.modules.diffusion_parts import load_inpaint_components, tiny_inpaint_components

log = logging.getLogger(__name__)

__all__ = [
    "PREDICTION_TYPES",
    "SwappableEMA",
    "adamw_8bit",
    "build_components",
    "replace_vae",
    "step_generator",
    "training_target",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from non-negative integers (numpy's SeedSequence mixes them)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def training_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """The regression target of the scheduler's `prediction_type`: the noise or the velocity."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"unsupported prediction_type {kind!r}: SemaniDiffModule trains {PREDICTION_TYPES}"
    )


def adamw_8bit() -> type:
    """bitsandbytes' `AdamW8bit`, or an ImportError that says how to get it."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(
            "use_8bit_adam=true needs bitsandbytes, which is not installed: `pip install "
            "bitsandbytes` (CUDA only), or set model.use_8bit_adam=false"
        ) from err
    return bnb.optim.AdamW8bit


def build_components(
    source: str | os.PathLike | None, tiny: Mapping[str, Any] | None, config: str | None
) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder", "tokenizer", "scheduler"} from `source` or `tiny`."""
    if (source is None) == (tiny is None):
        raise ValueError(
            "SemaniDiffModule needs exactly one of source= (an SD-inpainting diffusers folder, "
            "cached hub name or single file) and tiny= (tiny_inpaint_components kwargs), got "
            f"source={source!r}, tiny={tiny!r}"
        )
    if tiny is not None:
        parts = tiny_inpaint_components(**tiny)
        log.warning("SeMani-Diff parts built at RANDOM from tiny=%s (from-scratch runs)", tiny)
    else:
        parts = load_inpaint_components(source, config=config)
    want = 2 * parts["vae"].config.latent_channels + 1
    if parts["unet"].config.in_channels != want:
        raise ValueError(
            f"the UNet has {parts['unet'].config.in_channels} input channels; an inpainting UNet "
            f"needs {want} (noisy latent, mask, masked-image latent)"
        )
    return parts


def replace_vae(old: Any, path: str) -> Any:
    """The VAE saved at `path` (`load_vae`), checked against the one it replaces."""
    from semani.models.vae_module import load_vae

    new = load_vae(path)
    for key in ("latent_channels", "block_out_channels"):
        if key == "block_out_channels":  # the latent factor must match the UNet's grid
            a, b = len(old.config[key]), len(new.config[key])
        else:
            a, b = old.config[key], new.config[key]
        if a != b:
            raise ValueError(
                f"the VAE at {path} has {key}={new.config[key]}, the model expects "
                f"{old.config[key]}: train the VAE stage with the model's VAE shape"
            )
    log.info("VAE from %s (scaling factor %.4f)", path, new.config.scaling_factor)
    return new


class SwappableEMA(EMAModel):
    """diffusers' `EMAModel` of `model`'s parameters that can also stand in for them: `swap_in`
    puts the EMA weights into the model and keeps the training weights aside, `swap_out` puts
    those back (`weights()` does both around a block). It follows the model's device."""

    def __init__(self, model: nn.Module, decay: float, use_ema_warmup: bool = False) -> None:
        super().__init__(
            model.parameters(), decay=decay, use_ema_warmup=use_ema_warmup, foreach=True
        )
        self.model = model  # EMAModel is no nn.Module: nothing registers it
        self.active = False  # the EMA weights are in the model

    def follow_device(self) -> None:
        param = next(self.model.parameters())
        if self.shadow_params and self.shadow_params[0].device != param.device:
            self.to(param.device)

    def update(self) -> None:
        """One EMA step towards the model's current weights."""
        self.follow_device()
        self.step(self.model.parameters())

    def swap_in(self) -> bool:
        """Put the EMA weights into the model; True if this call did (False: already in)."""
        if self.active:
            return False
        self.follow_device()
        self.store(self.model.parameters())
        self.copy_to(self.model.parameters())
        self.active = True
        return True

    def swap_out(self) -> None:
        """Put the training weights back."""
        self.restore(self.model.parameters())
        self.active = False

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Within the block the model holds the EMA weights (a no-op if they are already in)."""
        swapped = self.swap_in()
        try:
            yield
        finally:
            if swapped:
                self.swap_out()

    def training_weights(self, prefix: str) -> dict[str, Tensor]:
        """{prefix + name: training weight} while swapped in (a checkpoint saved then must
        keep the training weights), else {}."""
        if not self.active:
            return {}
        names = (name for name, _ in self.model.named_parameters())
        return {f"{prefix}{name}": kept for name, kept in zip(names, self.temp_stored_params)}
