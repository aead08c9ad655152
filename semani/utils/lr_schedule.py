"""Linear warm-up, then halve-on-plateau: the SeMani-Trans learning-rate schedule.

The authors (`dalle_pytorch/lr_scheduler.py`, `train.py`/`finetune.py`) ramp the LR linearly
from `0.1 * lr` to `lr` over the first `warmup_steps` optimiser steps, and only then step a
`ReduceLROnPlateau(factor=0.5)` on the training loss, per iteration (pre-training, patience 50k
iterations) or per epoch (fine-tuning, patience 10 epochs), with `min_lr=1e-6`.

Here that is two schedulers on the same optimiser, both driven by Lightning:

- `LinearWarmup` (interval "step"): sets the LR during warm-up and leaves it alone afterwards,
  so it never undoes a plateau halving.
- `PlateauAfterWarmup` (interval "step" or "epoch", monitor e.g. `train/loss`): a
  `ReduceLROnPlateau` that ignores the metric until the warm-up is over.

`warmup_plateau_schedulers(optimizer, ...)` returns both as Lightning scheduler configs; use it as
a Hydra `_partial_` in the model config. Both states are plain values, so checkpoints load with
`torch.load(weights_only=True)` and resume where they stopped.

`cosine_warmup_config(optimizer, trainer, ...)`: the other modules' schedule (CLIP, mask
prompt, classifier, SeMani-Diff): linear warm-up, then cosine to a fraction of the LR at the
trainer's last step (or constant), per step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

__all__ = [
    "decay_groups",
    "LinearWarmup",
    "cosine_warmup_config",
    "PlateauAfterWarmup",
    "optimizer_config",
    "warmup_plateau_schedulers",
]


class LinearWarmup(LRScheduler):
    """lr(step) = base_lr * (f0 + (1 - f0) * step / warmup_steps) for step <= warmup_steps.

    After the warm-up the scheduler returns the optimiser's current LR (no-op), so another
    scheduler (the plateau one) owns the LR from then on.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        start_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"start_factor must be in [0, 1], got {start_factor}")
        self.warmup_steps = int(warmup_steps)
        self.start_factor = float(start_factor)
        super().__init__(optimizer, last_epoch)

    @property
    def finished(self) -> bool:
        """True once the LR has reached its base value."""
        return self.last_epoch >= self.warmup_steps

    def factor(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps

    def get_lr(self) -> list[float]:
        if self.last_epoch > self.warmup_steps:
            return [group["lr"] for group in self.optimizer.param_groups]
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


class PlateauAfterWarmup(ReduceLROnPlateau):
    """`ReduceLROnPlateau` that skips `step(metric)` calls until `warmup` has finished."""

    def __init__(self, optimizer: Optimizer, warmup: LinearWarmup | None = None, **kwargs: Any):
        super().__init__(optimizer, **kwargs)
        self.warmup = warmup

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        if self.warmup is not None and not self.warmup.finished:
            return
        super().step(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "warmup"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        warmup = self.warmup
        super().load_state_dict(state_dict)
        self.warmup = warmup


def warmup_plateau_schedulers(
    optimizer: Optimizer,
    warmup_steps: int = 5000,
    warmup_start_factor: float = 0.1,
    factor: float = 0.5,
    patience: int = 50000,
    interval: str = "step",
    monitor: str = "train/loss",
    min_lr: float = 1e-6,
    threshold: float = 1e-4,
    cooldown: int = 0,
) -> list[dict[str, Any]]:
    """Lightning scheduler configs: linear warm-up per step, then halve-on-plateau.

    Args:
        warmup_steps: optimiser steps of linear warm-up (paper: 5000 pre-train, 1000 fine-tune).
        warmup_start_factor: the first step's LR as a fraction of the peak (authors: 0.1).
        factor, patience, min_lr, threshold, cooldown: `ReduceLROnPlateau` arguments; `patience`
            counts `interval`s (paper: 50000 steps pre-train, 10 epochs fine-tune).
        interval: "step" or "epoch": how often the plateau scheduler reads `monitor`.
        monitor: the logged metric to watch (mode "min").
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
    warmup = LinearWarmup(optimizer, warmup_steps, warmup_start_factor)
    plateau = PlateauAfterWarmup(
        optimizer,
        warmup,
        mode="min",
        factor=factor,
        patience=patience,
        threshold=threshold,
        cooldown=cooldown,
        min_lr=min_lr,
    )
    return [
        {"scheduler": warmup, "interval": "step", "frequency": 1, "name": "lr"},
        {
            "scheduler": plateau,
            "interval": interval,
            "frequency": 1,
            "monitor": monitor,
            "strict": True,
            "name": "lr_plateau",
        },
    ]


def optimizer_config(optimizer: Optimizer, scheduler_factory: Any) -> Any:
    """`configure_optimizers`' return value: the optimizer alone without a scheduler factory,
    else `([optimizer], [scheduler config, ...])` from `scheduler_factory(optimizer)` (one config
    or a list)."""
    if scheduler_factory is None:
        return optimizer
    schedulers = scheduler_factory(optimizer)
    if not isinstance(schedulers, (list, tuple)):
        schedulers = [schedulers]
    return [optimizer], list(schedulers)


def decay_groups(params: Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay on matrices and kernels (>= 2-D) only, none on
    biases, norms and embeddings' 1-D scales (the usual AdamW rule)."""
    params = list(params)
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def cosine_warmup_config(
    optimizer: Optimizer,
    total_steps: float | None,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> dict[str, Any]:
    """`configure_optimizers`' return value with a per-step schedule: linear warm-up over
    `warmup_steps` (at most `total_steps`), then cosine to `min_lr_ratio * lr` at `total_steps`
    (the trainer's `estimated_stepping_batches`; `schedule="cosine"`) or constant
    (`"constant"`, which needs no total)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown LR schedule {schedule!r}: use 'cosine' or 'constant'")
    if schedule == "cosine" and total_steps is None:
        raise ValueError("the cosine schedule needs total_steps")
    total = max(1, int(total_steps)) if total_steps is not None else None
    warmup = int(warmup_steps) if total is None else min(int(warmup_steps), total)
    if schedule == "constant":
        sched = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    else:
        sched = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=min_lr_ratio
        )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
