"""Seam: how visible the mask's border is in an edit (not in the paper; Table I reports it
beside L2 so that a paste-back that leaves a hard edge shows up as a number).

For every pair of 4-neighbour pixels that straddles the mask border (one inside, one outside),
the mean absolute colour difference over RGB on the [0, 1] pixel scale; per image the mean over
its pairs, then the mean over images. The same figure on the input image is the reference (the
contrast the scene already has at that contour): an edit that blends in stays near it, a hard
paste lies above it. A recoloured entity may legitimately raise it (a blue bird on green leaves
has another contrast than a green one), so compare methods on the same cases, not with the
reference alone.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from semani.metrics.per_sample import as_index, select_samples

__all__ = ["SeamDifference", "seam_difference"]


def seam_difference(images: Tensor, masks: Tensor) -> Tensor:
    """(B, C, H, W) images in [-1, 1] and (B, H, W) bool masks -> (B,) the mean |colour
    difference| in [0, 1] scale across the border; NaN for an image whose mask has no border
    (empty or the whole image)."""
    if masks.shape[-2:] != images.shape[-2:] or masks.shape[0] != images.shape[0]:
        raise ValueError(
            f"masks {tuple(masks.shape)} do not match the images {tuple(images.shape)}"
        )
    x = images.double() / 2  # [0, 1] scale differences
    m = masks.bool()
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    count = torch.zeros_like(total)
    for dim in (-1, -2):  # horizontal, then vertical neighbours
        n = x.shape[dim]
        a, b = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
        ma, mb = m.narrow(dim, 0, n - 1), m.narrow(dim, 1, n - 1)
        cross = (ma != mb).double()  # (B, H', W') pairs across the border
        diff = (a - b).abs().mean(dim=1)  # (B, H', W') mean over channels
        total += (diff * cross).flatten(1).sum(1)
        count += cross.flatten(1).sum(1)
    return total / count  # NaN where count is 0


class SeamDifference(Metric):
    """`seam_difference` of the outputs and of the inputs (`compute()` -> both), over the
    images whose mask has a border.

    `update(inputs, outputs, masks, index=None)`: (B, C, H, W) each in [-1, 1], masks (B, H, W);
    `index` (B,) unique sample ids (duplicates from DDP padding are counted once).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("outputs", default=[], dist_reduce_fx="cat")
        self.add_state("inputs", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(
        self, inputs: Tensor, outputs: Tensor, masks: Tensor, index: Tensor | None = None
    ) -> None:
        if inputs.shape != outputs.shape:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} differ in shape"
            )
        with torch.no_grad():
            self.outputs.append(seam_difference(outputs, masks))
            self.inputs.append(seam_difference(inputs, masks))
        self.index.append(as_index(index, inputs.shape[0], inputs.device))

    def compute(self) -> Tensor:
        """(2,): the mean seam difference of the outputs, then of the inputs (the contrast the
        scene has at the mask's contours); NaN when no image had a border. One call, so that
        under DDP both come from the gathered rows."""
        keep = select_samples(dim_zero_cat(self.index))
        means = []
        for values in (self.outputs, self.inputs):
            rows = dim_zero_cat(values)[keep]
            means.append(rows[~rows.isnan()].mean())
        return torch.stack(means)
