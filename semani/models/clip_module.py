"""Train an open_clip CLIP from scratch (or fine-tune one) on (image, caption) pairs.

`ClipTrainModule` trains the WHOLE open_clip model (both towers and the temperature) with

- `loss="clip"`: CLIP's symmetric InfoNCE on the pooled embeddings (open_clip's `ClipLoss`);
- `loss="filip"`: FILIP's token-wise late-interaction InfoNCE on patch and token features
  (`semani.modules.filip`), optionally plus `global_loss_weight` x the CLIP loss, which also
  trains the pooled embeddings that a global CLIP user (the semantic loss) reads.

`dense_loss_weight` > 0 adds a region-word loss (not in the paper, for CLIPs trained on a data
set with entity masks, ShapesWorld): each entity's token-wise score for a word is computed
exactly as `TokenWiseScorer` computes it (mean over the entity's patch-grid cells, bilinear
"> 0", of the max over the word's own tokens in "a photo of a {word}." of the cosine), and two
cross-entropies with the CLIP temperature push it up for the entity's own word (its name, or
its description where the batch has `entity_words`): over the batch's words for each entity,
and over the image's entities for each word that occurs once in it. FILIP-large learned to
match a word to its patches from 340M pairs; a CLIP trained on 2000 synthetic scenes does not
(README, "Semantic alignment"), and this teaches it from the masks.

Batches are our data dicts: `image` (B, 3, H, W) in [-1, 1] (resized to the model's input size
if needed and normalised with its mean/std here) and `tokens` (B, L) CLIP BPE ids with L = the
model's context length (`data.context_length`). Validation and test log the loss and caption
retrieval R@1/R@5 (image -> text, each image against the captions of all images of the split,
its own being the one the data module drew): `r1`/`r5` with the training loss's similarity,
and `r1_global`/`r1_tokenwise` (and R@5) with each similarity explicitly.

Checkpoints name the class (`semani_model`) so `semani.load_model` opens them; at the end of
training the bare open_clip state dict goes to `<run>/<export_dir>/open_clip_model.pt`, which
`open_clip.create_model(model_name, pretrained=path)` and `ClipModel(model_name, pretrained=path)`
load. `export_open_clip(ckpt, out)` writes the same file from any checkpoint of this class.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.loss import ClipLoss
from torch import Tensor

from semani.modules.clip import clip_preprocess, resolve_pretrained
from semani.modules.clip_tokens import (
    encode_image_with_patches,
    encode_text_with_tokens,
    text_token_mask,
)
from semani.modules.filip import FilipLoss, filip_similarity
from semani.modules.token_scores import (
    DEFAULT_TEMPLATE,
    entity_token_scores,
    word_token_features,
)
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    check_overrides,
    export_dir,
    get_state_dict,
    load_checkpoint,
    load_state_dict_strict,
    name_checkpoint,
)
from semani.utils.lr_schedule import cosine_warmup_config
from semani.utils.masks import mask_to_token_mask

log = logging.getLogger(__name__)

__all__ = ["ClipTrainModule", "export_open_clip", "recall_at_k"]

LOSSES = ("clip", "filip")
EXPORT_NAME = "open_clip_model.pt"
RECALL_KS = (1, 5)
_PREFIX = "model."  # the open_clip model's keys inside our state dict


def recall_at_k(sim: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """sim (N, N) [query, candidate], the right candidate on the diagonal -> {k: R@k}.

    A query's rank counts the candidates scored strictly higher than its own (ties favour it).
    """
    own = sim.diagonal()[:, None]  # (N, 1)
    rank = (sim > own).sum(dim=1)  # (N,)
    return {k: float((rank < k).float().mean()) for k in ks}


class ClipTrainModule(pl.LightningModule):
    """Contrastive training of an open_clip model (see the module docstring).

    Args:
        model_name: an open_clip architecture (e.g. `semani-shapes-ViT` from
            `semani/modules/clip_configs/`, `ViT-B-32`).
        loss: "clip" (pooled embeddings, open_clip's `ClipLoss`) or "filip" (token-wise).
        pretrained: None (random init) or weights to start from (a local file or a cached
            open_clip tag, as `ClipModel` resolves them).
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay on >=2-D weights (not gains, biases or the temperature).
        betas, eps: AdamW betas and epsilon (open_clip's ViT recipe: (0.9, 0.98), 1e-6).
        warmup_steps: linear warm-up steps; then cosine decay to `min_lr_ratio * lr` at the
            trainer's last step.
        min_lr_ratio: the final LR as a fraction of `lr`.
        global_loss_weight: with loss="filip", weight of an added CLIP loss on the pooled
            embeddings (0: FILIP alone, as in the paper).
        max_logit_scale: the temperature's exp(scale) is clamped to [1, this] after every step.
        dense_loss_weight: weight of the region-word loss (module docstring; 0: off). Needs
            ``entity_masks`` and ``entity_words`` (or ``entity_names``) in the training batches
            (``data.entity_crops.with_entities=true``).
        dense_template: the prompt whose word tokens the region-word loss reads (the token-wise
            scorer's).
        export_dir: folder under the run's output dir for the open_clip state dict written at
            the end of training (None: no export).
        image_key, text_key: batch keys of the images and the token ids.
    """

    def __init__(
        self,
        model_name: str = "semani-shapes-ViT",
        loss: str = "clip",
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        global_loss_weight: float = 0.0,
        max_logit_scale: float = 100.0,
        dense_loss_weight: float = 0.0,
        dense_template: str = DEFAULT_TEMPLATE,
        export_dir: str | None = "clip",
        image_key: str = "image",
        text_key: str = "tokens",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown CLIP loss {loss!r}: use one of {LOSSES}")
        betas = [float(b) for b in betas]
        self.save_hyperparameters()
        source, tag_cfg = resolve_pretrained(model_name, pretrained)
        kwargs = {"force_quick_gelu": True} if tag_cfg.get("quick_gelu") else {}
        self.model = open_clip.create_model(model_name, pretrained=source, **kwargs)
        self.loss_name = loss
        self.clip_loss = ClipLoss()  # replaced by a gathering one under DDP (`setup`)
        self.filip_loss = FilipLoss()
        pre = getattr(self.model.visual, "preprocess_cfg", None) or {}
        mean, std = pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        size = self.model.visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.context_length = int(self.model.context_length)
        self.tokenizer = open_clip.get_tokenizer(model_name.replace("/", "-"))
        self.grid = tuple(getattr(self.model.visual, "grid_size", ()))
        if dense_loss_weight and len(self.grid) != 2:
            raise ValueError(f"dense_loss_weight needs a ViT's patch grid; {model_name} has none")
        self._eval_outputs: list[dict[str, Tensor]] = []
        n = sum(p.numel() for p in self.model.parameters())
        log.info("ClipTrainModule: %s (%.2fM parameters) from %s, loss %s",
                 model_name, n / 1e6, source or "random init", loss)  # fmt: skip

    # ---------------------------------------------------------------- inputs and features

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input, exactly as `ClipModel` prepares it."""
        return clip_preprocess(images.float(), self.image_size, self.mean, self.std)

    def _tokens(self, batch: Mapping[str, Any]) -> Tensor:
        tokens = batch[self.hparams.text_key]  # (B, L)
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"the batch has {tokens.shape[1]} tokens per caption but the CLIP's context "
                f"length is {self.context_length}: set data.context_length={self.context_length}"
            )
        return tokens

    def features(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """L2-normalised `image` (B, D), `text` (B, D), `patches` (B, N, D), `tokens` (B, L, D)
        and the `mask` (B, L) of the non-padding tokens."""
        ids = self._tokens(batch)
        image, patches = encode_image_with_patches(
            self.model, self.preprocess(batch[self.hparams.image_key]), normalize=True
        )
        text, tokens = encode_text_with_tokens(self.model, ids, normalize=True)
        mask = text_token_mask(ids)  # (B, L)
        return {"image": image, "text": text, "patches": patches, "tokens": tokens, "mask": mask}

    def compute_loss(self, f: Mapping[str, Tensor]) -> Tensor:
        """The training loss of a batch of `features`."""
        scale = self.model.logit_scale.exp()
        if self.loss_name == "clip":
            return self.clip_loss(f["image"], f["text"], scale)
        loss = self.filip_loss(f["patches"], f["tokens"], f["mask"], scale)
        if self.hparams.global_loss_weight:
            loss = loss + self.hparams.global_loss_weight * self.clip_loss(
                f["image"], f["text"], scale
            )
        return loss

    def entity_word_scores(
        self, patches: Tensor, masks: Sequence[Tensor], words: Sequence[str]
    ) -> list[Tensor]:
        """Token-wise scores of every entity against every word, as `TokenWiseScorer` has them.

        Args:
            patches: (B, N, D) L2-normalised patch-token embeddings.
            masks: per image a (K_b, H, W) {0, 1} entity-mask tensor.
            words: the V words.

        Returns:
            per image (K_b, V): mean over the entity's cells of the max over the word's tokens
            of the cosine (entities without a cell score 0).
        """
        feats, valid = word_token_features(
            self.model, self.tokenizer, self.hparams.dense_template, words, patches.device
        )  # (V, T, D), (V, T)
        sizes = [len(m) for m in masks]
        if not sum(sizes):
            return [patches.new_zeros(0, len(words)) for _ in masks]
        cells = mask_to_token_mask(torch.cat(list(masks)).to(patches.device), self.grid, 0.0,
                                   min_tokens=0).flatten(1)  # (sum K, N): one resize  # fmt: skip
        return [
            entity_token_scores(patches[b], feats, c, 0, valid).nan_to_num(0.0)  # (K, V)
            for b, c in enumerate(cells.split(sizes))
        ]

    def dense_loss(self, patches: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The region-word loss (module docstring) of a batch's `patches` (B, N, D)."""
        masks = batch.get("entity_masks")
        names = batch.get("entity_words", batch.get("entity_names"))  # descriptions or names
        if masks is None or names is None:
            raise ValueError(
                "dense_loss_weight > 0 needs entity_masks and entity_names in the batches: set "
                "data.entity_crops.with_entities=true (ShapesWorld, or COCO with instances)"
            )
        vocab = sorted({n for ns in names for n in ns})
        scale = self.model.logit_scale.exp()
        keep = [b for b, ns in enumerate(names) if len(ns)]
        scores = self.entity_word_scores(patches[keep], [masks[b] for b in keep], vocab)
        rows, row_targets, terms = [], [], []
        for s, ns in zip(scores, (names[b] for b in keep)):
            target = torch.tensor([vocab.index(n) for n in ns], device=s.device)  # (K,)
            rows.append(s)
            row_targets.append(target)
            for k, n in enumerate(ns):  # a name once in its image: pick its entity
                if len(ns) > 1 and ns.count(n) == 1:
                    logits = scale * s[:, vocab.index(n)]  # (K,)
                    terms.append(F.cross_entropy(logits, target.new_tensor(k)))
        loss = F.cross_entropy(scale * torch.cat(rows), torch.cat(row_targets))
        if terms:
            loss = 0.5 * (loss + torch.stack(terms).mean())
        return loss

    # ---------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if world > 1:  # negatives from every process for the global loss
            self.clip_loss = ClipLoss(
                local_loss=True, gather_with_grad=True, rank=self.global_rank, world_size=world
            )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        f = self.features(batch)
        loss = self.compute_loss(f)
        bs = batch[self.hparams.image_key].shape[0]
        if self.hparams.dense_loss_weight:
            dense = self.dense_loss(f["patches"], batch)
            self.log("train/dense_loss", dense.detach(), on_step=True, on_epoch=True,
                     batch_size=bs)  # fmt: skip
            loss = loss + self.hparams.dense_loss_weight * dense
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=bs)  # fmt: skip
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), on_step=True,
                 on_epoch=False, batch_size=bs)  # fmt: skip
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # as open_clip's training loop: temperature at most 1/100
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (decay on >=2-D weights only) with warm-up + cosine per step."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
        hp = self.hparams
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
        )  # fmt: skip
        return cosine_warmup_config(
            opt, self.trainer.estimated_stepping_batches, hp.warmup_steps, hp.min_lr_ratio
        )

    # ---------------------------------------------------------------- evaluation

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        f = self.features(batch)
        bs = f["image"].shape[0]
        self.log(f"{stage}/loss", self.compute_loss(f), sync_dist=True, batch_size=bs)
        self._eval_outputs.append({k: v.detach().cpu() for k, v in f.items()})

    def _eval_epoch_end(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        f = {k: self._gather(torch.cat([o[k] for o in outputs])) for k in outputs[0]}
        f = {k: v.float() if v.is_floating_point() else v for k, v in f.items()}
        s_i2t, _ = filip_similarity(f["patches"], f["tokens"], f["mask"], chunk_size=16)
        sims = {"global": f["image"] @ f["text"].T, "tokenwise": s_i2t}  # (N, N) [image, text]
        own = "global" if self.loss_name == "clip" else "tokenwise"
        for name, sim in sims.items():
            for k, r in recall_at_k(sim).items():
                self.log(f"{stage}/r{k}_{name}", r)  # the same on every process
                if name == own:
                    self.log(f"{stage}/r{k}", r, prog_bar=k == 1)

    def _gather(self, t: Tensor) -> Tensor:
        """All processes' rows (the distributed sampler gives every process as many)."""
        if self.trainer.world_size == 1:
            return t
        return self.all_gather(t.to(self.device)).flatten(0, 1).cpu()  # (world * n, ...)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---------------------------------------------------------------- checkpoints and export

    def open_clip_state_dict(self) -> dict[str, Tensor]:
        """The bare open_clip model's weights (CPU copies), loadable by `open_clip`."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        name_checkpoint(self, checkpoint)

    def on_train_end(self) -> None:
        """Write `<run>/<export_dir>/open_clip_model.pt` (not in fast_dev_run)."""
        folder = export_dir(self)
        if folder is None:
            return
        out = folder / EXPORT_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.open_clip_state_dict(), out)
        log.info("open_clip weights of %s written to %s", self.hparams.model_name, out)

    @classmethod
    def from_checkpoint_dict(
        cls, checkpoint: Mapping[str, Any], source: str, **overrides: Any
    ) -> ClipTrainModule:
        """A checkpoint already read -> a new module, loaded strictly; `overrides` replace
        hyper-parameters (`pretrained` is never re-read: the checkpoint has the weights)."""
        hp = checkpoint.get("hyper_parameters")
        if not isinstance(hp, Mapping) or "model_name" not in hp:
            raise CheckpointMismatchError(
                f"checkpoint '{source}' is not a ClipTrainModule checkpoint (its "
                "hyper_parameters have no 'model_name')"
            )
        check_overrides(cls, overrides)
        model = cls(**{**dict(hp), **overrides, "pretrained": None})
        load_state_dict_strict(
            model, get_state_dict(checkpoint, source), source, expected="a ClipTrainModule"
        )
        log.info("loaded ClipTrainModule from %s", source)
        return model


def export_open_clip(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the open_clip state dict of a `ClipTrainModule` checkpoint to `out` (torch.save).

    The weights are first loaded strictly into a fresh open_clip model of the checkpoint's
    `model_name`, so a file that is written also loads with
    `open_clip.create_model(model_name, pretrained=out)`.
    """
    ckpt = load_checkpoint(checkpoint)
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, Mapping) or "model_name" not in hp:
        raise CheckpointMismatchError(
            f"'{checkpoint}' is not a ClipTrainModule checkpoint (no hyper_parameters.model_name)"
        )
    sd = get_state_dict(ckpt, checkpoint)
    weights = {k[len(_PREFIX) :]: v for k, v in sd.items() if k.startswith(_PREFIX)}
    model = open_clip.create_model(hp["model_name"])
    load_state_dict_strict(model, weights, str(checkpoint), expected="an open_clip CLIP")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out)
    log.info("open_clip weights of %s (%s) written to %s", checkpoint, hp["model_name"], out)
    return out
