"""The paper's Table I (all numbers are the paper's, transcribed from the paper text, Table I).

`PAPER_TABLE1[(method, dataset)]` -> {"is_mean", "is_std", "clip_score", "r10", "l2"}: IS mean and
std over 10 splits, CLIP-score (100 x cosine, ResNet-50 CLIP), image->text R@10 in % (the target
plus 99 other captions), L2 error (own caption). The paper reports no R@1 / R@5 and nothing on
ShapesWorld. In the paper text the "±" between the IS mean and std is lost ("4.19 0.04"); the
pairs are read in the table's column order (IS, CLIP-score, R@10, L2-error per data set).
"""

from __future__ import annotations

__all__ = ["PAPER_DATASETS", "PAPER_METHODS", "PAPER_TABLE1"]

PAPER_METHODS = ("ManiGAN", "Lightweight-GAN", "Blended LDM", "SeMani-Trans", "SeMani-Diff")
PAPER_DATASETS = ("CUB", "Oxford", "COCO")
_KEYS = ("is_mean", "is_std", "clip_score", "r10", "l2")
# per method: CUB, Oxford, COCO, each (IS mean, IS std, CLIP-score, R@10, L2-error)
_ROWS = {
    "ManiGAN": [(4.19, 0.04, 21.30, 10.49, 0.05), (4.37, 0.11, 21.59, 14.21, 0.02),
                (22.65, 0.40, 11.91, 14.50, 0.03)],
    "Lightweight-GAN": [(4.66, 0.06, 18.88, 10.00, 0.13), (4.35, 0.09, 17.55, 11.58, 0.12),
                        (24.80, 0.94, 13.65, 14.49, 0.03)],
    "Blended LDM": [(5.95, 0.08, 23.34, 38.17, 0.02), (4.21, 0.09, 22.11, 21.19, 0.01),
                    (27.84, 0.63, 13.02, 28.64, 0.01)],
    "SeMani-Trans": [(5.02, 0.11, 23.56, 34.82, 0.01), (4.50, 0.06, 23.34, 36.49, 0.03),
                     (21.45, 0.41, 13.10, 21.32, 0.02)],
    "SeMani-Diff": [(5.13, 0.07, 24.03, 45.51, 0.02), (4.30, 0.08, 22.05, 17.37, 0.01),
                    (32.98, 0.61, 12.28, 24.73, 0.01)],
}  # fmt: skip
PAPER_TABLE1: dict[tuple[str, str], dict[str, float]] = {
    (method, dataset): dict(zip(_KEYS, values))
    for method, rows in _ROWS.items()
    for dataset, values in zip(PAPER_DATASETS, rows)
}
