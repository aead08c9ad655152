"""L2 error (Table I): mean squared pixel error between the input and the manipulated image.

Images in [-1, 1] are compared on the [0, 1] pixel scale (assumed: the paper gives no scale; its
Table I's values, e.g. 0.02, fit this one): per image the mean over channels and
pixels of ((output + 1) / 2 - (input + 1) / 2)^2, then the mean over images (all images have
one size, so this is the mean over every pixel of the set). The protocol uses it when the image
is manipulated with its own caption, where a good editor changes little.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from semani.metrics.per_sample import as_index, select_samples

__all__ = ["L2Error"]


class L2Error(Metric):
    """Mean squared error in [0, 1] pixel scale between inputs and outputs in [-1, 1].

    `update(inputs, outputs, index=None)`: (B, C, H, W) each; `index` (B,) unique sample ids
    (duplicates from DDP padding are counted once). `compute()` -> a scalar.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("errors", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, inputs: Tensor, outputs: Tensor, index: Tensor | None = None) -> None:
        if inputs.shape != outputs.shape:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} differ in shape"
            )
        with torch.no_grad():
            diff = (outputs.double() - inputs.double()) / 2  # [0, 1] scale
            errors = diff.pow(2).flatten(1).mean(dim=1)  # (B,)
        self.errors.append(errors)
        self.index.append(as_index(index, errors.shape[0], errors.device))

    def compute(self) -> Tensor:
        errors, index = dim_zero_cat(self.errors), dim_zero_cat(self.index)
        return errors[select_samples(index)].mean()
