"""``SemaniDataModule``: one LightningDataModule for every data set (``configs/data/*.yaml``).

``dataset`` picks the reader: ``cub`` | ``oxford`` | ``coco`` | ``shapes`` (map-style, AttnGAN/
StackGAN layouts, see each module for how to obtain the data) or ``webdataset`` (streaming tar
shards, CC12M). ``data.root=<dir>`` on the command line points it at the data. Splits: train =
``train``; val = ``test`` (as usual for the AttnGAN data sets), optionally capped to
``val_max_samples`` evenly spaced images; test = the whole ``test`` split. Evaluation splits pick
their captions deterministically. Batches are dicts from ``collate_samples``: ``image``
(B, 3, H, W) in [-1, 1], ``tokens`` (B, L), ``index`` (B,), and python lists ``caption`` and,
where the data set has them, ``entity_masks`` (K_b, H, W) and ``entity_names``.

``batch_size`` (and ``eval_batch_size``) are GLOBAL: each of the trainer's ``world_size``
processes loads ``batch_size / world_size`` samples per step, so one experiment file gives the
same optimisation on 1 GPU or 8 (the paper's 112 and 96 are global batches). A batch size that
the world size does not divide is an error.

``entity_crops`` (a dict of `EntityCropDataset` arguments, ShapesWorld or COCO with instances)
turns map-style samples into masked entity crops captioned with the entity's name: in training
with probability ``crop_prob`` (a CLIP that also sees single entities), and in evaluation too
when ``eval: true`` (mask-prompt tuning, whose validation classifies crops).
``inpaint_masks`` (a dict of `MaskSampler` arguments, map-style data sets): every training
sample also gets an inpainting mask drawn in the DataLoader workers (``inpaint_mask``,
``mask_kind``; `semani.data.inpaint_masks.InpaintMaskDataset`), which SeMani-Diff's training
step uses instead of drawing its own on the main process. ``entity_captions``: the chance that
a sample whose mask is one entity is captioned with that entity alone
(``entity_caption_template``, "{word}": "a little red circle").
``colourless_captions`` (ShapesWorld): the chance that a training caption loses its entities'
colour words (`semani.data.shapes.drop_entity_colours`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from semani.data.base import CaptionImageDataset, OnCorrupt, collate_samples
from semani.data.coco import COCODataset
from semani.data.cub import CUBDataset
from semani.data.entity_crops import EntityCropDataset
from semani.data.inpaint_masks import InpaintMaskDataset
from semani.data.oxford import OxfordFlowersDataset
from semani.data.shapes import ShapesWorldDataset
from semani.data.tokenizer import TextTokenizer
from semani.data.webdataset import make_webdataset, resolve_shards
from semani.utils.checkpoint import plain_hparams

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "SemaniDataModule", "collate_samples"]

DATASETS: dict[str, type[CaptionImageDataset]] = {
    "cub": CUBDataset,
    "oxford": OxfordFlowersDataset,
    "coco": COCODataset,
    "shapes": ShapesWorldDataset,
}
DEFAULT_WDS_VAL_SAMPLES = 1024


class SemaniDataModule(pl.LightningDataModule):
    """Train/val/test loaders of one caption data set (see the module docstring)."""

    def __init__(
        self,
        dataset: str,
        root: str,
        image_size: int = 256,
        batch_size: int = 16,
        num_workers: int = 4,
        context_length: int = 128,
        on_corrupt: OnCorrupt = "skip",
        val_max_samples: int | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
        train_split: str = "train",
        test_split: str = "test",
        instances_json: str | Mapping[str, str] | None = None,
        shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_size: int | None = None,
        seed: int = 0,
        entity_crops: Mapping[str, Any] | None = None,
        colourless_captions: float = 0.0,
        inpaint_masks: Mapping[str, Any] | None = None,
        entity_captions: float = 0.0,
        entity_caption_template: str = "{word}",
    ) -> None:
        super().__init__()
        if dataset not in (*DATASETS, "webdataset"):
            raise ValueError(
                f"unknown dataset {dataset!r}; choose one of {[*DATASETS, 'webdataset']}"
            )
        if instances_json is not None and dataset != "coco":
            raise ValueError("instances_json is a COCO option; set data.dataset=coco or drop it")
        if dataset == "webdataset" and not shards:
            raise ValueError("dataset=webdataset needs data.shards, e.g. '{00000..01242}.tar'")
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        if colourless_captions and dataset != "shapes":
            raise ValueError(
                "colourless_captions is a ShapesWorld option (dataset=shapes); set it to 0"
            )
        if entity_crops is not None:
            if dataset == "webdataset":
                raise ValueError("entity_crops needs entity masks: use dataset=shapes or coco")
            allowed = {*inspect.signature(EntityCropDataset).parameters} - {"base"} | {"eval"}
            unknown = sorted(set(entity_crops) - allowed)
            if unknown:
                raise ValueError(
                    f"unknown data.entity_crops keys {unknown}; allowed: {sorted(allowed)}"
                )
        if inpaint_masks is not None:
            if dataset == "webdataset":
                raise ValueError(
                    "inpaint_masks is for map-style data sets; with dataset=webdataset set "
                    "data.inpaint_masks=null (the model draws the masks)"
                )
            # unknown keys or bad values: fail now, not in a DataLoader worker
            InpaintMaskDataset([], entity_captions, entity_caption_template, **inpaint_masks)
        elif entity_captions:
            raise ValueError(
                "entity_captions re-captions samples whose inpainting mask is one entity: it "
                "needs data.inpaint_masks (e.g. ${model.masks}), or set it to 0"
            )
        # plain containers in the checkpoint's hyper-parameters (weights-only loadable)
        entity_crops, instances_json = plain_hparams(entity_crops), plain_hparams(instances_json)
        inpaint_masks = plain_hparams(inpaint_masks)
        self.save_hyperparameters(logger=False)
        self.tokenizer = TextTokenizer(context_length)
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None
        self.world_size = 1  # set from the trainer in setup()

    # -- datasets ---------------------------------------------------------------------------------
    def _map_dataset(self, split: str, deterministic: bool) -> Dataset:
        hp = self.hparams
        ds = self._reader(split, deterministic)
        crops = dict(hp.entity_crops or {})
        if crops and (not deterministic or crops.pop("eval", False)):
            crops.pop("eval", None)
            ds = EntityCropDataset(ds, **crops)
        masks = hp.get("inpaint_masks")
        if masks is not None and not deterministic:  # training only: evaluation stays fixed
            ds = InpaintMaskDataset(
                ds,
                hp.get("entity_captions", 0.0),
                hp.get("entity_caption_template", "{word}"),
                **masks,
            )
        return ds

    def _reader(self, split: str, deterministic: bool) -> CaptionImageDataset:
        hp = self.hparams
        kwargs: dict[str, Any] = {}
        if hp.dataset == "coco" and hp.instances_json is not None:
            kwargs["instances_json"] = hp.instances_json
        if hp.dataset == "shapes":
            kwargs["colourless_prob"] = hp.get("colourless_captions", 0.0)
        return DATASETS[hp.dataset](
            root=hp.root,
            split=split,
            image_size=hp.image_size,
            context_length=hp.context_length,
            deterministic=deterministic,
            on_corrupt=hp.on_corrupt,
            tokenizer=self.tokenizer,
            **kwargs,
        )

    def _stream(self, shards: Any, train: bool, max_samples: int | None) -> IterableDataset:
        hp = self.hparams
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return make_webdataset(
            resolve_shards(hp.root, shards),
            image_size=hp.image_size,
            tokenizer=self.tokenizer,
            train=train,
            shuffle_buffer=hp.shuffle_buffer,
            resampled=hp.resampled and train,
            epoch_size=hp.epoch_size if train else None,
            max_samples=max_samples,
            world_size=world_size,
            num_workers=hp.num_workers,
            on_corrupt=hp.on_corrupt,
            seed=hp.seed,
        )

    def _eval_dataset(self, capped: bool) -> Dataset:
        hp = self.hparams
        if hp.dataset == "webdataset":
            if hp.val_shards is None:
                log.warning("no data.val_shards: evaluating on the first training samples")
                cap = hp.val_max_samples or DEFAULT_WDS_VAL_SAMPLES
                return self._stream(hp.shards, train=False, max_samples=cap)
            return self._stream(hp.val_shards, False, hp.val_max_samples if capped else None)
        ds = self._map_dataset(hp.test_split, deterministic=True)
        if capped and hp.val_max_samples is not None and hp.val_max_samples < len(ds):
            idx = np.unique(np.linspace(0, len(ds) - 1, hp.val_max_samples).round().astype(int))
            return Subset(ds, idx.tolist())
        return ds

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs (bad layouts fail here with the expected layout)."""
        hp = self.hparams
        self.world_size = self.trainer.world_size if self.trainer is not None else 1
        self.per_device_batch_size(hp.batch_size)  # fail early when it does not divide
        if stage in (None, "fit") and self.data_train is None:
            if hp.dataset == "webdataset":
                self.data_train = self._stream(hp.shards, train=True, max_samples=None)
            else:
                self.data_train = self._map_dataset(hp.train_split, deterministic=False)
        if stage in (None, "fit", "validate") and self.data_val is None:
            self.data_val = self._eval_dataset(capped=True)
        if stage in (None, "test", "predict") and self.data_test is None:
            self.data_test = self._eval_dataset(capped=False)
        for name in ("data_train", "data_val", "data_test"):
            ds = getattr(self, name)
            if ds is not None and not isinstance(ds, IterableDataset):
                log.info("%s %s: %d samples from %s", hp.dataset, name, len(ds), hp.root)

    # -- loaders ----------------------------------------------------------------------------------
    def per_device_batch_size(self, global_batch_size: int) -> int:
        """The global batch divided over the processes (an error when it does not divide)."""
        if global_batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={global_batch_size} is the global batch and must be divisible "
                f"by the world size {self.world_size} (devices x nodes): set data.batch_size to "
                f"a multiple of {self.world_size}"
            )
        return global_batch_size // self.world_size

    def _loader(self, ds: Dataset | None, train: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        hp = self.hparams
        batch_size = self.per_device_batch_size(
            hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        )
        iterable = isinstance(ds, IterableDataset)
        drop_last = train and hp.drop_last and (iterable or len(ds) >= batch_size)
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=train and not iterable,
            num_workers=hp.num_workers,
            collate_fn=collate_samples,
            pin_memory=hp.pin_memory,
            drop_last=drop_last,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)
