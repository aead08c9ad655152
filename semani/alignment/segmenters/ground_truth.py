"""``GroundTruthSegmenter``: a data set's own entity masks as proposals (oracle studies, tests).

ShapesWorld and COCO (with ``data.instances_json``) samples carry ``entity_masks`` (K, H, W) and
``entity_names``; the proposals are those masks, in the data set's order, each with score 1.0 and
its name. Three ways to give them::

    seg = GroundTruthSegmenter()
    seg.segment(image, entity_masks=masks, entity_names=names)  # explicit
    seg.segment(sample["image"], sample=sample)                 # a data set sample
    GroundTruthSegmenter(dataset=ds).segment(image, index=i)    # sample i of a data set
    GroundTruthSegmenter.from_sample(sample).segment(image)     # bound: for EntityAligner
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from semani.alignment.segmenters.common import ImageLike, finalize_proposals, image_size
from semani.alignment.types import EntityProposals

__all__ = ["GroundTruthSegmenter"]

NO_ENTITIES = (
    "this sample has no entity_masks: only data sets with entity ground truth have them "
    "(data=shapes; data=coco with data.instances_json)"
)


class GroundTruthSegmenter:
    """The data set's entity masks, with names (see the module docstring).

    dataset: optional map-style data set whose samples hold ``entity_masks``/``entity_names``,
    for ``segment(image, index=i)``. min_area_frac, max_proposals: see ``finalize_proposals``.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]] | None = None,
        min_area_frac: float = 0.0,
        max_proposals: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        self.sample: Mapping[str, Any] | None = None

    @classmethod
    def from_sample(cls, sample: Mapping[str, Any], **kwargs: Any) -> GroundTruthSegmenter:
        """A segmenter bound to one sample: ``segment(image)`` returns its entities (so it can
        stand where a learned segmenter does, e.g. in ``EntityAligner``)."""
        if sample.get("entity_masks") is None:
            raise KeyError(NO_ENTITIES)
        seg = cls(**kwargs)
        seg.sample = sample
        return seg

    def segment(
        self,
        image: ImageLike | None = None,
        sample: Mapping[str, Any] | None = None,
        *,
        entity_masks: Tensor | None = None,
        entity_names: Sequence[str] | None = None,
        index: int | None = None,
    ) -> EntityProposals:
        """The entity masks of ``entity_masks``, ``sample``, ``dataset[index]`` or the bound
        sample (the first given).

        The masks are resized (nearest) to ``image``'s size when it differs; ``image`` may be
        None with ``sample``/``index`` (the sample's image gives the size).
        """
        if entity_masks is None:
            if sample is None and index is None:
                sample = self.sample
            if sample is None and index is not None:
                if self.dataset is None:
                    raise ValueError("segment(index=...) needs GroundTruthSegmenter(dataset=...)")
                sample = self.dataset[index]
            if sample is None:
                raise ValueError("give entity_masks, sample or index (with a dataset)")
            if sample.get("entity_masks") is None:
                raise KeyError(NO_ENTITIES)
            entity_masks, entity_names = sample["entity_masks"], sample.get("entity_names")
            if image is None:
                image = sample["image"]
        if image is None:
            size = (int(entity_masks.shape[-2]), int(entity_masks.shape[-1]))
        else:
            size = image_size(image)
        masks = torch.as_tensor(entity_masks)
        if masks.dim() != 3:
            raise ValueError(f"entity_masks must be (K, H, W), got {tuple(masks.shape)}")
        names = list(entity_names) if entity_names is not None else None
        if names is not None and len(names) != masks.shape[0]:
            raise ValueError(f"{len(names)} entity_names for {masks.shape[0]} entity_masks")
        return finalize_proposals(
            masks.bool() if masks.dtype != torch.bool else masks,
            torch.ones(masks.shape[0]),
            size,
            names,
            self.min_area_frac,
            self.max_proposals,
        )
