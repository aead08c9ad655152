"""Mask-prompt tuning (OVSeg): train only `mask_embedding` of a frozen CLIP on entity crops.

Batches are `EntityCropDataset` crops (`data.entity_crops`): ``image`` (B, 3, S, S) masked
entity crops in [-1, 1], ``crop_mask`` (B, S, S), ``tokens`` (B, L) their captions ("a photo of
a circle.") and ``entity_name``. The crops go through `MaskPromptCLIP.encode_masked` (the prompt
replaces the background patch tokens); both CLIP towers are frozen, so `mask_embedding` is the
only parameter that changes. Losses:

- `loss="clip"`: CLIP's symmetric InfoNCE between the crops and their captions in the batch
  (open_clip's `ClipLoss`, which OVSeg's open_clip-based mask-prompt tuning uses (assumed));
- `loss="vocabulary"`: cross-entropy of each crop against the prompts of every `vocabulary`
  word (a contrastive loss over the vocabulary's texts, as OVSeg's class-name classifier; the
  right one for a small vocabulary like ShapesWorld's 7 shapes, where an in-batch loss would
  count a crop's twins as negatives).

Both use the CLIP's own temperature. Validation and test log ``acc``: the vocabulary word whose
prompt is closest to the crop's embedding is the crop's entity name (chance = 1 / |vocabulary|
for balanced data). At the end of training the prompt goes to
``<run>/<export_dir>/mask_prompt.pt`` (with the CLIP's fingerprint), which
`MaskPromptScorer(..., pretrained=<the same CLIP>, mask_prompt=<file>)` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor

from semani.modules.mask_clip import MaskPromptCLIP, quickgelu_name
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    check_overrides,
    export_dir,
    get_state_dict,
    load_state_dict_strict,
    name_checkpoint,
)
from semani.utils.lr_schedule import cosine_warmup_config

log = logging.getLogger(__name__)

__all__ = ["MaskPromptTuningModule"]

LOSSES = ("clip", "vocabulary")
EXPORT_NAME = "mask_prompt.pt"


class MaskPromptTuningModule(pl.LightningModule):
    """OVSeg's mask-prompt tuning (see the module docstring).

    Args:
        vocabulary: the entity names (validation accuracy; the classes of loss="vocabulary").
        model_name, pretrained, ovseg_ckpt, depth, square: the `MaskPromptCLIP` to tune.
        loss: "clip" (in-batch InfoNCE) or "vocabulary" (cross-entropy over the vocabulary).
        template: the prompt of a vocabulary word, with `{word}`.
        lr, weight_decay, betas: AdamW on `mask_embedding` (OVSeg: lr 0.05, no weight decay).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine to `min_lr_ratio * lr`.
        export_dir: folder under the run's output dir for `mask_prompt.pt` (None: no export).
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        ovseg_ckpt: str | None = None,
        depth: int = 3,
        square: bool = False,
        loss: str = "clip",
        template: str = "a photo of a {word}.",
        lr: float = 0.05,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.98),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        export_dir: str | None = "mask_prompt",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown mask-prompt loss {loss!r}: use one of {LOSSES}")
        vocabulary = [str(w) for w in vocabulary]
        if not vocabulary or len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"vocabulary must be non-empty without repeats, got {vocabulary}")
        betas = [float(b) for b in betas]
        self.save_hyperparameters()
        self.model = MaskPromptCLIP(
            model_name, pretrained, depth=depth, ovseg_ckpt=ovseg_ckpt, square=square
        )
        if self.model.depth == 0:
            raise ValueError("depth=0 has no mask prompt to tune")
        self.index = {w: i for i, w in enumerate(vocabulary)}
        self.clip_loss = ClipLoss()
        self._vocab_emb: Tensor | None = None  # (V, D), frozen text tower: computed once
        n = self.model.mask_embedding.numel()
        log.info("mask-prompt tuning of %s (depth %d, %d trainable values), vocabulary of %d",
                 model_name, depth, n, len(vocabulary))  # fmt: skip

    # ---------------------------------------------------------------- features

    def vocabulary_embeddings(self) -> Tensor:
        """(V, D) normalised text embeddings of the vocabulary's prompts."""
        if self._vocab_emb is None or self._vocab_emb.device != self.device:
            prompts = [self.hparams.template.format(word=w) for w in self.hparams.vocabulary]
            # a normal tensor even when first asked for in validation (inference mode)
            with torch.inference_mode(False), torch.no_grad():
                self._vocab_emb = self.model.clip.encode_text(prompts)  # (V, D)
        return self._vocab_emb

    def labels(self, names: Sequence[str]) -> Tensor:
        unknown = sorted({n for n in names if n not in self.index})
        if unknown:
            raise ValueError(
                f"entity names {unknown} are not in the model's vocabulary "
                f"{list(self.hparams.vocabulary)}; add them to model.vocabulary"
            )
        return torch.tensor([self.index[n] for n in names], device=self.device)  # (B,)

    def crop_embeddings(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, D) normalised mask-prompted embeddings of the batch's crops."""
        crops, masks = batch["image"].float(), batch["crop_mask"].float()
        size = self.model.clip.image_size
        if tuple(crops.shape[-2:]) != tuple(size):  # the data's crop size -> the CLIP input
            crops = F.interpolate(crops, size=size, mode="bicubic", align_corners=False)
            masks = F.interpolate(masks[:, None], size=size, mode="nearest")[:, 0]
        return self.model.encode_masked(crops.clamp(-1, 1), masks)  # (B, D)

    def step(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """-> (loss, vocabulary accuracy) of a batch."""
        emb = self.crop_embeddings(batch)  # (B, D)
        scale = self.model.clip.model.logit_scale.exp()
        labels = self.labels(batch["entity_name"])  # (B,)
        logits = scale * emb @ self.vocabulary_embeddings().T  # (B, V)
        if self.hparams.loss == "vocabulary":
            loss = F.cross_entropy(logits, labels)
        else:
            with torch.no_grad():
                text = self.model.clip.encode_text(batch["tokens"])  # (B, D)
            loss = self.clip_loss(emb, text, scale)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, acc

    # ---------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if world > 1:
            self.clip_loss = ClipLoss(
                local_loss=True, gather_with_grad=True, rank=self.global_rank, world_size=world
            )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, acc = self.step(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=bs)  # fmt: skip
        self.log("train/acc", acc, on_step=True, on_epoch=True, batch_size=bs)
        return loss

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        loss, acc = self.step(batch)
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc", acc, sync_dist=True, batch_size=bs, prog_bar=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(
            self.model.trainable_parameters(), lr=hp.lr, betas=tuple(hp.betas),
            weight_decay=hp.weight_decay,
        )  # fmt: skip
        return cosine_warmup_config(
            opt, self.trainer.estimated_stepping_batches, hp.warmup_steps, hp.min_lr_ratio
        )

    # ---------------------------------------------------------------- checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        name_checkpoint(self, checkpoint)

    def export_mask_prompt(self, out: str | Path) -> Path:
        """Write the prompt with the CLIP's fingerprint (`MaskPromptCLIP.load_mask_prompt`)."""
        hp = self.hparams
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = self.model.mask_prompt_state(source=hp.ovseg_ckpt or hp.pretrained)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({**state, "vocabulary": list(hp.vocabulary)}, tmp)
        tmp.replace(out)  # never a half-written file
        log.info("mask prompt written to %s", out)
        return out

    def on_train_end(self) -> None:
        folder = export_dir(self)
        if folder is not None:
            self.export_mask_prompt(folder / EXPORT_NAME)

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> MaskPromptTuningModule:
        """A checkpoint already read -> a new module, loaded strictly (the frozen CLIP's
        weights are in the checkpoint: `pretrained`/`ovseg_ckpt` are not re-read)."""
        hp = checkpoint.get("hyper_parameters")
        if not isinstance(hp, Mapping) or "vocabulary" not in hp:
            raise CheckpointMismatchError(
                f"checkpoint '{source}' is not a MaskPromptTuningModule checkpoint (its "
                "hyper_parameters have no 'vocabulary')"
            )
        check_overrides(cls, overrides)
        hp = {**dict(hp), **overrides}
        if hp.get("ovseg_ckpt"):  # built as OVSeg's QuickGELU CLIP: the same without the file
            hp["model_name"] = quickgelu_name(hp["model_name"])
        model = cls(**{**hp, "pretrained": None, "ovseg_ckpt": None})
        load_state_dict_strict(
            model, get_state_dict(checkpoint, source), source, expected="a MaskPromptTuningModule"
        )
        return model
