"""The semantic alignment phase: segment -> score -> select.

from semani.alignment import EntityAligner, TokenWiseScorer
aligner = EntityAligner(TokenWiseScorer("ViT-B-16", "pretrained/clip/ViT-B-16.pt"), segmenter)
result = aligner.align(image, "bird", token_grid=(16, 16))  # result.mask, result.token_mask
"""

from semani.alignment.aligner import EntityAligner, EntityEdit, parse_entity_edits
from semani.alignment.scorers import EntityScorer, MaskedCropClipScorer, MaskPromptScorer
from semani.alignment.segmenters import GroundTruthSegmenter, build_segmenter
from semani.alignment.token_scorer import TokenWiseScorer
from semani.alignment.types import AlignmentResult, EntityNotFoundError, EntityProposals

__all__ = [
    "AlignmentResult",
    "EntityAligner",
    "EntityEdit",
    "EntityNotFoundError",
    "EntityProposals",
    "EntityScorer",
    "GroundTruthSegmenter",
    "MaskPromptScorer",
    "MaskedCropClipScorer",
    "TokenWiseScorer",
    "build_segmenter",
    "parse_entity_edits",
]
