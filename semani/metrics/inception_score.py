"""Inception Score with any classifier, as a DDP-synchronised torchmetrics `Metric`.

IS = exp(E_x KL(p(y|x) || p(y))) on each of `splits` consecutive parts of the samples, reported
as the mean and the (population, `np.std`) standard deviation over the parts: the definition of
the original TF code, of StackGAN's `inception_score.py` and of torch-fidelity. Part `i` holds
samples `[i * N // splits, (i + 1) * N // splits)` of the samples in id order (`index`), or of a
seeded permutation of them (`shuffle_seed`, torch-fidelity's `np.random.RandomState(seed)`;
torch-fidelity uses 2020). torchmetrics' `InceptionScore` differs in three ways: an unseeded
permutation, `chunk` parts and the unbiased std.

The classifier is any `nn.Module` mapping images to logits (preprocessing included, see
`semani.metrics.classifiers` and `semani.metrics.shapes_classifier`); with `drop_first_logit`
the first logit (StackGAN's background class) is removed before the softmax.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from semani.metrics.per_sample import as_index, select_samples

__all__ = ["InceptionScore", "inception_score"]


def inception_score(
    logits: Tensor, splits: int = 10, shuffle_seed: int | None = None
) -> tuple[Tensor, Tensor]:
    """(N, C) logits -> (mean, std) of the IS over `splits` parts, in float64 (see the module)."""
    n = logits.shape[0]
    if n < splits:
        raise ValueError(
            f"the Inception Score over {splits} splits needs >= {splits} samples, got {n}"
        )
    if shuffle_seed is not None:
        perm = np.random.RandomState(shuffle_seed).permutation(n)
        logits = logits[torch.from_numpy(perm).to(logits.device)]
    logits = logits.double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)  # (N, C)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_y = p[lo:hi].mean(dim=0, keepdim=True)  # (1, C) marginal of the part
        kl = (p[lo:hi] * (log_p[lo:hi] - p_y.log())).sum(dim=1)  # (n_i,)
        scores.append(kl.mean().exp())
    s = torch.stack(scores)  # (splits,)
    return s.mean(), s.std(unbiased=False)


class InceptionScore(Metric):
    """Inception Score (mean, std) of images scored by `classifier`.

    Args:
        classifier: (B, 3, H, W) images -> (B, C) logits; frozen by this metric (`eval()`).
        splits: parts of the samples (10 in the paper).
        drop_first_logit: drop logit 0 (StackGAN's background class) before the softmax.
        shuffle_seed: None: parts in sample-id order; an int: torch-fidelity's seeded shuffle.

    `update(images, index=None)`: images as the classifier takes them (generator outputs in
    [-1, 1] for this project's classifiers); `index` (B,) unique sample ids, which make the
    result independent of how the samples are spread over processes. `compute()` ->
    (mean, std), float64 scalars.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        classifier: nn.Module,
        splits: int = 10,
        drop_first_logit: bool = False,
        shuffle_seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if splits < 1:
            raise ValueError(f"splits must be >= 1, got {splits}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.splits = int(splits)
        self.drop_first_logit = bool(drop_first_logit)
        self.shuffle_seed = shuffle_seed
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, images: Tensor, index: Tensor | None = None) -> None:
        self.classifier.eval()
        with torch.no_grad():
            logits = self.classifier(images).float()  # (B, C)
        if self.drop_first_logit:
            logits = logits[:, 1:]  # (B, C - 1)
        self.logits.append(logits)
        self.index.append(as_index(index, logits.shape[0], logits.device))

    def compute(self) -> tuple[Tensor, Tensor]:
        logits, index = dim_zero_cat(self.logits), dim_zero_cat(self.index)
        return inception_score(logits[select_samples(index)], self.splits, self.shuffle_seed)
