"""The paper's metrics (Table I) as torchmetrics `Metric`s, synchronised under DDP.

`InceptionScore` (any classifier: `TFInceptionV3` for COCO, `StackGANInceptionV3` for CUB and
Oxford, `ShapesClassifier` for ShapesWorld), `ClipScore`, `ClipRecall` (image->text R@N),
`L2Error`, `SeamDifference` (not the paper's: the mask border's visibility), and
`Table1Metrics`, which holds them with one CLIP (`configs/metrics/`).
"""

from semani.metrics.classifiers import StackGANInceptionV3, TFInceptionV3, require_weights
from semani.metrics.clip_metrics import ClipRecall, ClipScore, load_clip
from semani.metrics.inception_score import InceptionScore, inception_score
from semani.metrics.l2 import L2Error
from semani.metrics.seam import SeamDifference, seam_difference
from semani.metrics.shapes_classifier import ShapesClassifier, load_shapes_classifier
from semani.metrics.table1 import Table1Metrics

__all__ = [
    "ClipRecall",
    "ClipScore",
    "InceptionScore",
    "L2Error",
    "SeamDifference",
    "ShapesClassifier",
    "StackGANInceptionV3",
    "TFInceptionV3",
    "Table1Metrics",
    "inception_score",
    "load_clip",
    "load_shapes_classifier",
    "require_weights",
    "seam_difference",
]
