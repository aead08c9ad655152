"""``EntitySegModule``: a class-agnostic Mask2Former trained on a data set's entity masks.

EntitySeg is trained class-agnostically: every entity is one "entity" class, so the model only
learns where entities are. Here transformers' ``Mask2FormerForUniversalSegmentation`` is built
from scratch (no pretrained weights; a small Swin backbone from ``model.backbone_config``) with
one label, and trained on ``entity_masks`` (ShapesWorld; COCO with instances): the batch's
masks become ``mask_labels`` (K_b, H, W) and ``class_labels`` zeros (K_b,), and Mask2Former's own
Hungarian-matched loss (class CE + mask BCE + dice on sampled points, auxiliary losses on every
decoder layer) is the training loss.

Validation and test run the ``mask2former`` segmenter's post-processing (panoptic, labels
dropped) and log the proposal recall at IoU 0.5 against the ground truth (``val/recall@0.5``:
the fraction of ground-truth entities that some proposal overlaps with IoU >= 0.5) and the mean
number of proposals. At the end of fitting the model is exported with ``save_pretrained`` (plus
the matching image processor config) to ``export_dir``, which the ``mask2former`` segmenter loads:
``alignment/segmenter=mask2former alignment.segmenter.model_name_or_path=<export_dir>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from semani.modules.panoptic import mask_recall, panoptic_segments
from semani.utils.atomic import atomic_dir
from semani.utils.checkpoint import export_dir, plain_hparams
from semani.utils.lr_schedule import optimizer_config

log = logging.getLogger(__name__)

__all__ = ["EntitySegModule"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the Mask2Former image processor's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


class EntitySegModule(pl.LightningModule):
    """Class-agnostic entity segmentation with a from-scratch Mask2Former (module docstring).

    config: ``Mask2FormerConfig`` keyword arguments; ``backbone_config`` a dict with
        ``model_type`` (e.g. ``swin``) and that backbone's config arguments.
    image_size: the training resolution; the exported processor resizes the shorter side to it.
    optimizer, scheduler: Hydra partials (``optimizer(params=...)``, ``scheduler(optimizer)``).
    threshold, mask_threshold, overlap_mask_area_threshold: the panoptic post-processing used for
        the recall (the segmenter's keys of the same names).
    iou_thresh: IoU at which a ground-truth entity counts as recalled.
    export_dir: where ``on_fit_end`` writes the ``save_pretrained`` folder (None: nowhere).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        image_size: int = 64,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        iou_thresh: float = 0.5,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        config = plain_hparams(config)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.hparams["config"] = config  # plain values: checkpoints load weights-only
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        m2f_config = Mask2FormerConfig(**config, id2label={0: "entity"}, label2id={"entity": 0})
        self.model = Mask2FormerForUniversalSegmentation(m2f_config)
        self.processor = self.make_processor(image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)
        self._recall: dict[str, list[int]] = {}
        log.info(
            "class-agnostic Mask2Former: %.2fM parameters, %d queries, %s backbone",
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            m2f_config.num_queries,
            m2f_config.backbone_config.model_type,
        )

    @staticmethod
    def make_processor(image_size: int) -> Any:
        """The image processor that reproduces this module's input: shorter side to
        ``image_size``, sizes rounded up to a multiple of 32, ImageNet normalisation."""
        from transformers import Mask2FormerImageProcessor

        return Mask2FormerImageProcessor(
            size={"shortest_edge": image_size, "longest_edge": 4 * image_size},
            size_divisor=32,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            num_labels=1,
        )

    # -- forward --------------------------------------------------------------------------------
    def pixel_values(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> the model's ImageNet-normalised input (as the processor)."""
        return ((images + 1) / 2 - self.mean) / self.std

    def forward(self, images: Tensor, entity_masks: list[Tensor] | None = None) -> Any:
        """Mask2Former outputs; with ``entity_masks`` (B lists of (K_b, H, W)) also ``.loss``."""
        kwargs: dict[str, Any] = {}
        if entity_masks is not None:
            kwargs["mask_labels"] = [m.to(self.device, torch.float32) for m in entity_masks]
            kwargs["class_labels"] = [
                torch.zeros(m.shape[0], dtype=torch.long, device=self.device) for m in entity_masks
            ]
        return self.model(pixel_values=self.pixel_values(images), **kwargs)

    def proposals(self, outputs: Any, size: tuple[int, int]) -> list[tuple[Tensor, Tensor]]:
        """The ``mask2former`` segmenter's proposals for a batch of outputs at ``size``: per
        image masks (K, H, W) bool and scores (K,), best first."""
        hp = self.hparams
        return panoptic_segments(
            outputs,
            [size] * outputs.class_queries_logits.shape[0],
            threshold=hp.threshold,
            mask_threshold=hp.mask_threshold,
            overlap_mask_area_threshold=hp.overlap_mask_area_threshold,
        )

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self(batch["image"], batch["entity_masks"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch: Mapping[str, Any], split: str) -> None:
        images, gts = batch["image"], batch["entity_masks"]
        outputs = self(images, gts)
        bs = images.shape[0]
        self.log(f"{split}/loss", outputs.loss, sync_dist=True, batch_size=bs)
        props = self.proposals(outputs, tuple(images.shape[-2:]))
        counts = self._recall.setdefault(split, [0, 0, 0, 0])  # hits, entities, proposals, imgs
        for (masks, _), gt in zip(props, gts):
            hits, total = mask_recall(masks, gt, self.hparams.iou_thresh)
            counts[0] += hits
            counts[1] += total
            counts[2] += len(masks)
            counts[3] += 1

    def _eval_epoch_end(self, split: str) -> None:
        hits, total, n_props, n_images = self._recall.pop(split, [0, 0, 0, 0])
        stats = torch.tensor([hits, total, n_props, n_images], dtype=torch.float64)
        stats = (
            self.all_gather(stats).reshape(-1, 4).sum(0) if self.trainer.world_size > 1 else stats
        )
        iou = self.hparams.iou_thresh
        self.log(f"{split}/recall@{iou}", (stats[0] / stats[1].clamp(min=1)).float())
        self.log(f"{split}/proposals", (stats[2] / stats[3].clamp(min=1)).float())

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], max_images: int = 8, **_: Any) -> dict:
        """Inputs, predicted proposals and ground truth as colour maps, (N, 3, H, W) in [-1, 1]."""
        images = batch["image"][:max_images].to(self.device)
        props = self.proposals(self(images), tuple(images.shape[-2:]))
        pred = torch.stack([_colour_masks(masks) for masks, _ in props])
        gt = torch.stack([_colour_masks(m.bool()) for m in batch["entity_masks"][:max_images]])
        return {"inputs": images, "proposals": pred, "ground_truth": gt}

    # -- optimisation and export ----------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        optimizer = factory(params=self.model.parameters())
        return optimizer_config(optimizer, self.scheduler_factory)

    def export(self, folder: str | Path) -> Path:
        """Write the model and its image processor with ``save_pretrained`` (the segmenter's
        ``model_name_or_path``)."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:  # an installed segmenter is replaced whole or not at all
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
        log.info("exported the entity segmenter to %s (alignment/segmenter=mask2former)", folder)
        return folder

    def on_fit_end(self) -> None:
        """Export to `export_dir` (an absolute path, or one under the run folder); not in a
        fast_dev_run (`debug=fdr` must not overwrite an installed segmenter)."""
        if export_dir(self) is not None:
            self.export(Path(self.trainer.default_root_dir) / self.hparams.export_dir)


def _colour_masks(masks: Tensor) -> Tensor:
    """(K, H, W) bool -> (3, H, W) in [-1, 1]: each mask in a fixed colour, later ones on top."""
    palette = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0]]
    )
    out = torch.full((3, *masks.shape[-2:]), -1.0)
    for k, m in enumerate(masks.cpu()):
        out[:, m] = palette[k % len(palette)][:, None] * 2 - 1
    return out
