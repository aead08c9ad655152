"""Per-sample metric states that give the same result on 1 or N processes.

Every metric here keeps one row per sample in list states reduced with "cat" plus the sample's
id (`index`, e.g. the data set index of the image). Under DDP, torchmetrics concatenates the
processes' rows in rank order, which is not the data order of a single process (a
`DistributedSampler` deals the samples out round-robin) and may hold a sample twice (the
sampler pads the last round with repeats). `select_samples` undoes both: rows sorted by id, the
first row of each id kept. Rows updated without ids stay in the order they arrived.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NO_INDEX", "as_index", "select_samples"]

NO_INDEX = -1  # the id stored for a row updated without one


def as_index(index: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
    """The (B,) int64 ids of a batch; `NO_INDEX` for every row when `index` is None."""
    if index is None:
        return torch.full((batch_size,), NO_INDEX, dtype=torch.long, device=device)
    index = torch.as_tensor(index, device=device).long().flatten()  # (B,)
    if index.numel() != batch_size:
        raise ValueError(f"index has {index.numel()} entries for a batch of {batch_size}")
    if (index < 0).any():
        raise ValueError("sample ids (index) must be >= 0")
    return index


def select_samples(index: Tensor) -> Tensor:
    """(N,) ids -> positions of the rows to use: sorted by id, the first row of each id.

    With no ids at all (every row `NO_INDEX`) every row, in arrival order. Mixing rows with and
    without ids is an error (the order of the result would be ill-defined).
    """
    missing = index == NO_INDEX
    if missing.all():
        return torch.arange(index.numel(), device=index.device)
    if missing.any():
        raise ValueError(
            "some updates passed sample ids (index) and some did not: pass index to every update "
            "or to none"
        )
    order = torch.sort(index, stable=True).indices  # (N,) first arrival first among equal ids
    ids = index[order]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    return order[keep]  # (M,) M = number of distinct ids
