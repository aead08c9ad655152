"""``OVSegSegmenter``: OVSeg's MaskFormer (Swin-B) as a class-agnostic entity segmenter.

SeMani-Diff "uses the segmentation model and fine-tuned CLIP model in OVSeg" (Liang et al.,
CVPR 2023). The CLIP side is ``semani.modules.mask_clip``; this is the segmentation side, read
from the same released detectron2 checkpoint (``ovseg_swinbase_vitL14_ft_mpt.pth``, a dict whose
"model" holds every weight) into transformers' ``MaskFormerForInstanceSegmentation``.

Architecture (facebookresearch/ov-seg, ``configs/ovseg_swinB_vitL_bs32_120k.yaml`` over the
defaults of ``open_vocab_seg/config.py``; ``OVSegArch`` holds it, a field per config key):

- backbone ``D2SwinTransformer`` (``modeling/backbone/swin.py``): Swin-B, patch 4, embed 128,
  depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 12, pretrain size 384, no absolute position
  embedding, a LayerNorm ``norm{i}`` on each output res2..res5;
- pixel decoder ``BasePixelDecoder`` (``modeling/heads/pixel_decoder.py``, the default
  ``PIXEL_DECODER_NAME``): an FPN, 256 channels, GroupNorm(32), nearest upsampling, and a 3x3
  ``mask_features`` conv to MASK_DIM 256: transformers' ``MaskFormerPixelDecoder``;
- transformer predictor ``OpenVocabTransformerPredictor``
  (``modeling/transformer/open_vocab_transformer_predictor.py``): DETR decoder on res5 (1x1
  ``input_proj`` 1024 -> 256), 100 queries, hidden 256, 8 heads, FFN 2048, 0 encoder and 6
  post-norm decoder layers, a 3-layer ``mask_embed`` MLP; its class head ``class_embed`` is an MLP
  256 -> 1024 -> 768 into CLIP ViT-L/14's joint space (``OVSegClassHead`` replaces transformers'
  linear ``class_predictor``, so ``class_queries_logits`` are these query embeddings).

The class head is open-vocabulary (``ovseg_model.py``, ``modeling/clip_adapter/adapter.py``):
logits = 100 * cos(query embedding, [text embeddings of the class names ..., void]), the void
being ``clip_adapter.non_object_embedding`` (L2-normalised), and ``F.softmax(logits)[..., :-1]``
the class probabilities. A query's object score here is 1 - p(void) of that softmax: OVSeg's own
rule, but it needs class names, and proposals have none. The names are a fixed small generic
vocabulary (assumed: ``GENERIC_VOCABULARY``, COCO-Stuff's supercategories, the training set's
coarse classes), each embedded as OVSeg does (``text_template.py``): the 14 ViLD templates
through OVSeg's own CLIP text tower (``clip_adapter.clip_model.*`` of the same checkpoint),
averaged and normalised. Other text embeddings can be passed as a tensor.

Proposals: each query whose object score exceeds ``threshold``, its mask upsampled as OVSeg's
inference does (bilinear to the padded input, crop, bilinear to the image), sigmoid >
``mask_threshold`` (OVSeg's CLIP_ADAPTER.MASK_THR 0.4 picks foreground the same way), then
``finalize_proposals``. Input as OVSeg's test mapper: RGB, short side 640 (MIN_SIZE_TEST), long
side at most 2560, bilinear (torch's antialiased resize stands in for detectron2's PIL one),
normalised with its pixel mean/std (0-255 scale), zero-padded to a multiple of 32.

Loading is strict (``ovseg_key_map``): every OVSeg MaskFormer key (``backbone.*``,
``sem_seg_head.*``, ``criterion.empty_weight``) is used, the fused q/k/v tensors split in three,
and every model key is filled; a mismatch names the keys. The keys deliberately not used (the
CLIP's when text embeddings are given, the CLIP adapter's buffers, ...) are logged by prefix at
debug level.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

from semani.alignment.segmenters.common import (
    ImageLike,
    Sample,
    finalize_proposals,
    image_size,
    to_uint8_image,
)
from semani.alignment.types import EntityProposals
from semani.modules.clip import ClipModel
from semani.modules.mask_clip import OVSEG_CLIP_PREFIX, quickgelu_name, read_ovseg_clip_state
from semani.utils.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict_strict,
)
from semani.utils.disk_cache import cache_dir, file_key, load_tensors, save_tensors

log = logging.getLogger(__name__)

__all__ = [
    "GENERIC_VOCABULARY",
    "OVSEG_PIXEL_MEAN",
    "OVSEG_PIXEL_STD",
    "OVSegArch",
    "OVSegClassHead",
    "OVSegSegmenter",
    "VILD_TEMPLATES",
    "build_ovseg_maskformer",
    "hf_to_ovseg",
    "object_scores",
    "ovseg_key_map",
    "ovseg_preprocess",
    "ovseg_text_embeddings",
    "ovseg_to_hf",
    "upsample_mask_logits",
]

OVSEG_PIXEL_MEAN = (123.675, 116.280, 103.530)  # MODEL.PIXEL_MEAN, RGB on the 0-255 scale
OVSEG_PIXEL_STD = (58.395, 57.120, 57.375)  # MODEL.PIXEL_STD
SIZE_DIVISIBILITY = 32  # MODEL.MASK_FORMER.SIZE_DIVISIBILITY: the input is zero-padded to it
SIM_TEMPERATURE = 100.0  # ClipAdapter.get_sim_logits' temperature
MASKFORMER_PREFIXES = ("backbone.", "sem_seg_head.", "criterion.")
VOID_KEY = "clip_adapter.non_object_embedding"
# CLIP_ADAPTER.TEXT_TEMPLATES "vild": the ViLD prompt ensemble OVSeg averages per class name
VILD_TEMPLATES = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)  # fmt: skip
# (assumed) the class names the void logit competes with: COCO-Stuff's supercategories (OVSeg
# trains on COCO-Stuff's 171 classes), worded as plain nouns
GENERIC_VOCABULARY = (
    "person", "animal", "vehicle", "food", "furniture", "electronic device", "appliance",
    "accessory", "sports equipment", "kitchenware", "indoor object", "outdoor object", "plant",
    "building", "structure", "textile", "wall", "floor", "ceiling", "window", "ground", "sky",
    "water", "rock",
)  # fmt: skip


@dataclass
class OVSegArch:
    """OVSeg's MaskFormer, one field per config key (``configs/ovseg_swinB_vitL_bs32_120k.yaml``;
    defaults not set there come from ``open_vocab_seg/config.py``)."""

    pretrain_img_size: int = 384  # MODEL.SWIN.PRETRAIN_IMG_SIZE
    patch_size: int = 4  # MODEL.SWIN.PATCH_SIZE (config.py)
    embed_dim: int = 128  # MODEL.SWIN.EMBED_DIM
    depths: tuple[int, ...] = (2, 2, 18, 2)  # MODEL.SWIN.DEPTHS
    num_heads: tuple[int, ...] = (4, 8, 16, 32)  # MODEL.SWIN.NUM_HEADS
    window_size: int = 12  # MODEL.SWIN.WINDOW_SIZE
    mlp_ratio: float = 4.0  # MODEL.SWIN.MLP_RATIO (config.py)
    drop_path_rate: float = 0.3  # MODEL.SWIN.DROP_PATH_RATE (training only)
    convs_dim: int = 256  # MODEL.SEM_SEG_HEAD.CONVS_DIM: the FPN's width
    mask_dim: int = 256  # MODEL.SEM_SEG_HEAD.MASK_DIM: per-pixel mask embeddings
    num_classes: int = 171  # MODEL.SEM_SEG_HEAD.NUM_CLASSES (sizes criterion.empty_weight only)
    embedding_dim: int = 768  # MODEL.SEM_SEG_HEAD.EMBEDDING_DIM: CLIP ViT-L/14's joint space
    embed_hidden_dim: int = 1024  # MODEL.SEM_SEG_HEAD.EMBED_HIDDEN_DIM (config.py)
    embed_layers: int = 2  # MODEL.SEM_SEG_HEAD.EMBED_LAYERS: depth of the class head MLP
    hidden_dim: int = 256  # MODEL.MASK_FORMER.HIDDEN_DIM
    num_queries: int = 100  # MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    nheads: int = 8  # MODEL.MASK_FORMER.NHEADS
    dim_feedforward: int = 2048  # MODEL.MASK_FORMER.DIM_FEEDFORWARD
    dec_layers: int = 6  # MODEL.MASK_FORMER.DEC_LAYERS (ENC_LAYERS 0, PRE_NORM False)
    dropout: float = 0.1  # MODEL.MASK_FORMER.DROPOUT (training only)
    no_object_weight: float = 0.1  # MODEL.MASK_FORMER.NO_OBJECT_WEIGHT (criterion.empty_weight)

    def __post_init__(self) -> None:
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} differ in length"
            )

    @classmethod
    def build(cls, arch: OVSegArch | Mapping | None) -> OVSegArch:
        """The real Swin-B architecture (None), or it with a mapping's fields overridden."""
        if arch is None or isinstance(arch, OVSegArch):
            return arch or cls()
        unknown = sorted(set(arch) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown OVSeg architecture keys {unknown}; known: {list(asdict(cls()))}"
            )
        return cls(**arch)

    @property
    def channels(self) -> list[int]:
        """Channels of res2 .. res5."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def maskformer_config(self) -> MaskFormerConfig:
        """The transformers config of this architecture (the class head is swapped afterwards)."""
        backbone = SwinConfig(
            image_size=self.pretrain_img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            drop_path_rate=self.drop_path_rate,
            use_absolute_embeddings=False,  # MODEL.SWIN.APE False
            out_features=[f"stage{i + 1}" for i in range(len(self.depths))],
        )
        decoder = {
            "model_type": "detr",
            "num_queries": self.num_queries,
            "d_model": self.hidden_dim,
            "encoder_layers": 0,
            "decoder_layers": self.dec_layers,
            "decoder_attention_heads": self.nheads,
            "decoder_ffn_dim": self.dim_feedforward,
            "dropout": self.dropout,
            "attention_dropout": self.dropout,
            "activation_dropout": self.dropout,
            "activation_function": "relu",
        }
        return MaskFormerConfig(
            backbone_config=backbone,
            decoder_config=decoder,
            fpn_feature_size=self.convs_dim,
            mask_feature_size=self.mask_dim,
            num_labels=self.num_classes,
            no_object_weight=self.no_object_weight,
        )


class OVSegClassHead(nn.Module):
    """OVSeg's ``class_embed``: an MLP (ReLU between layers) from a query to CLIP's joint space."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x  # (..., out_dim) query embeddings, not yet normalised


def build_ovseg_maskformer(arch: OVSegArch) -> MaskFormerForInstanceSegmentation:
    """transformers' MaskFormer shaped as OVSeg's (random weights).

    Two modules differ from transformers' own: ``class_predictor`` is ``OVSegClassHead`` (its
    outputs are query embeddings, not logits), and the Swin model's final ``layernorm``, whose
    output MaskFormer never reads (its features are the stage outputs through
    ``hidden_states_norms``) and which OVSeg does not have, is an ``nn.Identity``.
    """
    model = MaskFormerForInstanceSegmentation(arch.maskformer_config())
    model.class_predictor = OVSegClassHead(
        arch.hidden_dim, arch.embed_hidden_dim, arch.embedding_dim, arch.embed_layers
    )
    model.model.pixel_level_module.encoder.model.layernorm = nn.Identity()
    return model


# -- keys -----------------------------------------------------------------------------------------
_SWIN = "model.pixel_level_module.encoder."
_PIXEL_DECODER = "model.pixel_level_module.decoder."
_TRANSFORMER = "model.transformer_module."


def ovseg_key_map(arch: OVSegArch) -> dict[str, tuple[str, ...]]:
    """OVSeg key -> the transformers key(s) it fills; a fused q/k/v tensor fills three (its rows
    in q, k, v order, as Swin's ``qkv`` and ``nn.MultiheadAttention.in_proj_*`` hold them)."""
    m: dict[str, tuple[str, ...]] = {}

    def wb(src: str, dst: str, params: Sequence[str] = ("weight", "bias")) -> None:
        for p in params:
            m[f"{src}.{p}"] = (f"{dst}.{p}",)

    def fused(src: str, dst: str, names: Sequence[str]) -> None:
        for p in ("weight", "bias"):
            m[f"{src}{p}"] = tuple(f"{dst}.{n}.{p}" for n in names)

    sw = _SWIN + "model."
    wb("backbone.patch_embed.proj", sw + "embeddings.patch_embeddings.projection")
    wb("backbone.patch_embed.norm", sw + "embeddings.norm")
    for i, depth in enumerate(arch.depths):
        src, dst = f"backbone.layers.{i}", f"{sw}encoder.layers.{i}"
        for j in range(depth):
            s, d = f"{src}.blocks.{j}", f"{dst}.blocks.{j}"
            wb(f"{s}.norm1", f"{d}.layernorm_before")
            for t in ("relative_position_bias_table", "relative_position_index"):
                m[f"{s}.attn.{t}"] = (f"{d}.attention.self.{t}",)
            fused(f"{s}.attn.qkv.", f"{d}.attention.self", ("query", "key", "value"))
            wb(f"{s}.attn.proj", f"{d}.attention.output.dense")
            wb(f"{s}.norm2", f"{d}.layernorm_after")
            wb(f"{s}.mlp.fc1", f"{d}.intermediate.dense")
            wb(f"{s}.mlp.fc2", f"{d}.output.dense")
        if i < len(arch.depths) - 1:
            wb(f"{src}.downsample.reduction", f"{dst}.downsample.reduction", ("weight",))
            wb(f"{src}.downsample.norm", f"{dst}.downsample.norm")
        wb(f"backbone.norm{i}", f"{_SWIN}hidden_states_norms.{i}")

    # BasePixelDecoder: layer_{n} (3x3 conv + GN on res5) is transformers' stem; then, top-down,
    # adapter_k (1x1 lateral conv + GN) and layer_k (3x3 conv + GN) of res{k+1} are
    # fpn.layers.{n-1-k}
    px, n = "sem_seg_head.pixel_decoder", len(arch.depths)
    wb(f"{px}.layer_{n}", f"{_PIXEL_DECODER}fpn.stem.0", ("weight",))
    wb(f"{px}.layer_{n}.norm", f"{_PIXEL_DECODER}fpn.stem.1")
    for k in range(n - 1, 0, -1):
        layer = f"{_PIXEL_DECODER}fpn.layers.{n - 1 - k}"
        wb(f"{px}.adapter_{k}", f"{layer}.proj.0", ("weight",))
        wb(f"{px}.adapter_{k}.norm", f"{layer}.proj.1")
        wb(f"{px}.layer_{k}", f"{layer}.block.0", ("weight",))
        wb(f"{px}.layer_{k}.norm", f"{layer}.block.1")
    wb(f"{px}.mask_features", f"{_PIXEL_DECODER}mask_projection")

    pr = "sem_seg_head.predictor"
    m[f"{pr}.query_embed.weight"] = (f"{_TRANSFORMER}queries_embedder.weight",)
    if arch.channels[-1] != arch.hidden_dim:  # else OVSeg's input_proj is an empty Sequential
        wb(f"{pr}.input_proj", f"{_TRANSFORMER}input_projection")
    for i in range(arch.dec_layers):
        s, d = f"{pr}.transformer.decoder.layers.{i}", f"{_TRANSFORMER}decoder.layers.{i}"
        for ours, theirs in (("self_attn", "self_attn"), ("multihead_attn", "encoder_attn")):
            fused(f"{s}.{ours}.in_proj_", f"{d}.{theirs}", ("q_proj", "k_proj", "v_proj"))
            wb(f"{s}.{ours}.out_proj", f"{d}.{theirs}.o_proj")
        wb(f"{s}.linear1", f"{d}.mlp.fc1")
        wb(f"{s}.linear2", f"{d}.mlp.fc2")
        wb(f"{s}.norm1", f"{d}.self_attn_layer_norm")
        wb(f"{s}.norm2", f"{d}.encoder_attn_layer_norm")
        wb(f"{s}.norm3", f"{d}.final_layer_norm")
    wb(f"{pr}.transformer.decoder.norm", f"{_TRANSFORMER}decoder.layernorm")
    for i in range(3):  # MLP(hidden, hidden, mask_dim, 3)
        wb(f"{pr}.mask_embed.layers.{i}", f"mask_embedder.{i}.0")
    for i in range(arch.embed_layers):
        wb(f"{pr}.class_embed.layers.{i}", f"class_predictor.layers.{i}")
    m["criterion.empty_weight"] = ("criterion.empty_weight",)
    return m


def _names(keys: Sequence[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def ovseg_to_hf(state: Mapping[str, Tensor], arch: OVSegArch, source: str) -> dict[str, Tensor]:
    """The MaskFormer keys of an OVSeg "model" dict -> a transformers state dict, strictly.

    Keys outside ``MASKFORMER_PREFIXES`` are ignored. Raises CheckpointMismatchError naming the
    MaskFormer keys OVSeg's model has that the checkpoint lacks, and those it has in excess.
    """
    key_map = ovseg_key_map(arch)
    missing = [k for k in key_map if k not in state]
    unexpected = [k for k in state if k.startswith(MASKFORMER_PREFIXES) and k not in key_map]
    if missing or unexpected:
        lines = [f"checkpoint '{source}' does not hold OVSeg's MaskFormer with {arch}."]
        if missing:
            lines.append(f"{len(missing)} missing keys: {_names(missing)}.")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}.")
        raise CheckpointMismatchError(" ".join(lines))
    out: dict[str, Tensor] = {}
    for src, dsts in key_map.items():
        tensor = state[src]
        if tensor.shape[0] % len(dsts):
            raise CheckpointMismatchError(
                f"checkpoint '{source}': {src} {tuple(tensor.shape)} does not split in {len(dsts)}"
            )
        out.update(zip(dsts, tensor.chunk(len(dsts)) if len(dsts) > 1 else (tensor,)))
    return out


def hf_to_ovseg(state: Mapping[str, Tensor], arch: OVSegArch) -> dict[str, Tensor]:
    """The inverse of ``ovseg_to_hf``: a transformers state dict in OVSeg's names (tests,
    checkpoints written for OVSeg's code)."""
    return {
        src: state[dsts[0]] if len(dsts) == 1 else torch.cat([state[d] for d in dsts])
        for src, dsts in ovseg_key_map(arch).items()
    }


def _log_unused(state: Mapping[str, Tensor], used: set[str], source: str) -> None:
    groups = Counter(".".join(k.split(".")[:2]) for k in state if k not in used)  # by prefix
    if groups:
        log.debug(
            "OVSeg keys not used from %s: %s",
            source,
            ", ".join(f"{p} ({n})" for p, n in sorted(groups.items())),
        )


# -- scores, text, images -------------------------------------------------------------------------
def object_scores(
    query_embeddings: Tensor,
    text_embeddings: Tensor,
    void_embedding: Tensor,
    temperature: float = SIM_TEMPERATURE,
) -> Tensor:
    """(..., Q, D) query embeddings -> (..., Q) object scores, 1 - p(void).

    OVSeg's classification: logits = temperature * cos(query, [text (C, D) ..., void (1, D)]),
    softmax over the C + 1 classes; p(void) is the last column.
    """
    q = query_embeddings / query_embeddings.norm(dim=-1, keepdim=True)
    void = void_embedding.reshape(1, -1)
    classes = torch.cat([text_embeddings, void / void.norm(dim=-1, keepdim=True)])  # (C+1, D)
    logits = temperature * q @ classes.to(q.dtype).T  # (..., Q, C+1)
    return 1.0 - logits.softmax(dim=-1)[..., -1]


@torch.no_grad()
def ovseg_text_embeddings(
    clip: ClipModel, vocabulary: Sequence[str], templates: Sequence[str] = VILD_TEMPLATES
) -> Tensor:
    """(C, D) class-name embeddings as OVSeg's ``PredefinedPromptExtractor``: each template's
    normalised text embedding, averaged over the templates, normalised again."""
    per_template = [clip.encode_text([t.format(name) for name in vocabulary]) for t in templates]
    mean = torch.stack(per_template).mean(dim=0)  # (C, D)
    return mean / mean.norm(dim=-1, keepdim=True)


def ovseg_preprocess(
    pixels: Tensor, min_size: int = 640, max_size: int = 2560
) -> tuple[Tensor, tuple[int, int]]:
    """(3, H, W) uint8 RGB -> ((1, 3, Hp, Wp) normalised input, (h, w) the resized size).

    detectron2's ResizeShortestEdge(min_size, max_size) (short side to ``min_size``, long side at
    most ``max_size``, sizes rounded half up), bilinear with antialiasing, back to uint8 levels;
    then OVSeg's mean/std and zero padding (after normalising) to a multiple of 32.
    """
    H, W = pixels.shape[-2:]
    scale = min_size / min(H, W)
    if max(H, W) * scale > max_size:
        scale = max_size / max(H, W)
    h, w = int(H * scale + 0.5), int(W * scale + 0.5)
    x = pixels.float()[None]  # (1, 3, H, W) in 0..255
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)  # detectron2 resizes uint8 images
    mean = torch.tensor(OVSEG_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OVSEG_PIXEL_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    hp, wp = (-(-s // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in (h, w))
    return F.pad(x, (0, wp - w, 0, hp - h)), (h, w)  # (1, 3, Hp, Wp)


def upsample_mask_logits(
    logits: Tensor, padded: tuple[int, int], resized: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """(K, h', w') mask logits -> (K, H, W) probabilities, as OVSeg's inference: bilinear to the
    padded input, crop the resized image, bilinear to the original size, sigmoid."""
    x = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)
    x = x[..., : resized[0], : resized[1]]  # detectron2's sem_seg_postprocess
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x[0].sigmoid()


# -- the segmenter --------------------------------------------------------------------------------
class OVSegSegmenter:
    """Class-agnostic proposals from OVSeg's MaskFormer (one per query), best object score first.

    ovseg_ckpt: OVSeg's ``ovseg_swinbase_vitL14_ft_mpt.pth`` (detectron2: {"model": ...}).
    device: where the model runs. threshold: a query is a proposal when its object score
    (1 - p(void)) exceeds this. mask_threshold: probability that binarises its mask.
    min_area_frac, max_proposals: see ``finalize_proposals``.
    vocabulary: the class names p(void) is computed against (assumed: ``GENERIC_VOCABULARY``),
    embedded with the checkpoint's own CLIP (``clip_model_name``, QuickGELU) and the ViLD
    templates. text_embeddings: (C, D) normalised class embeddings to use instead (the CLIP is then
    not loaded). min_size, max_size: the test-time resize (OVSeg: 640, 2560).
    arch: ``OVSegArch`` or a mapping of its fields to override (tests); None: OVSeg's Swin-B.
    cache_vocabulary: keep the vocabulary's embeddings in the user's cache
    (`semani.utils.disk_cache`, keyed by the checkpoint file, the CLIP name, the names and the
    templates): the next process skips loading the CLIP and its text tower (ViT-L/14 over
    C x 14 prompts: half a minute per start on a CPU).
    """

    def __init__(
        self,
        ovseg_ckpt: str | os.PathLike,
        device: str = "cpu",
        threshold: float = 0.5,
        mask_threshold: float = 0.4,
        min_area_frac: float = 0.0,
        max_proposals: int | None = 5,
        vocabulary: Sequence[str] | None = None,
        text_embeddings: Tensor | None = None,
        clip_model_name: str = "ViT-L-14",
        min_size: int = 640,
        max_size: int = 2560,
        arch: OVSegArch | Mapping | None = None,
        cache_vocabulary: bool = True,
    ) -> None:
        self.threshold, self.mask_threshold = threshold, mask_threshold
        self.min_area_frac, self.max_proposals = min_area_frac, max_proposals
        self.min_size, self.max_size = min_size, max_size
        self.device = torch.device(device)
        self.arch = OVSegArch.build(arch)
        source = str(ovseg_ckpt)

        state = load_checkpoint(ovseg_ckpt).get("model")
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(
                f"'{source}' is not an OVSeg (detectron2) checkpoint: no 'model' dict; pass "
                "OVSeg's ovseg_swinbase_vitL14_ft_mpt.pth"
            )
        model = build_ovseg_maskformer(self.arch)
        load_state_dict_strict(
            model,
            ovseg_to_hf(state, self.arch, source),
            source=source,
            expected=f"OVSeg's MaskFormer converted to transformers' names ({self.arch})",
        )
        self.model = model.to(self.device).eval().requires_grad_(False)
        void = state.get(VOID_KEY)
        if void is None or void.numel() != self.arch.embedding_dim:
            got = "nothing" if void is None else tuple(void.shape)
            raise CheckpointMismatchError(
                f"checkpoint '{source}': {VOID_KEY} should be (1, {self.arch.embedding_dim}), "
                f"got {got}: the void class of OVSeg's open-vocabulary head"
            )
        self.void_embedding = void.detach().float().reshape(1, -1).to(self.device)

        used = set(ovseg_key_map(self.arch)) | {VOID_KEY}
        if text_embeddings is None:
            used |= {k for k in state if k.startswith(OVSEG_CLIP_PREFIX)}
        _log_unused(state, used, source)
        del state  # the CLIP, when needed, is read again below: one copy in memory at a time

        if text_embeddings is None:
            self.vocabulary: list[str] | None = list(vocabulary or GENERIC_VOCABULARY)
            text_embeddings = self._vocabulary_embeddings(
                source, clip_model_name, self.vocabulary, cache_vocabulary
            )
        else:
            self.vocabulary = list(vocabulary) if vocabulary is not None else None
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.arch.embedding_dim:
            raise ValueError(
                f"text_embeddings must be (C, {self.arch.embedding_dim}), "
                f"got {tuple(text_embeddings.shape)}"
            )
        self.text_embeddings = text_embeddings.detach().float().to(self.device)  # (C, D)
        log.info(
            "loaded OVSeg's MaskFormer from %s (%.1fM parameters, %d queries, %d class names "
            "against the void) on %s",
            source,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            self.arch.num_queries,
            self.text_embeddings.shape[0],
            self.device,
        )

    def _vocabulary_embeddings(
        self, source: str, clip_name: str, vocabulary: list[str], cache: bool
    ) -> Tensor:
        """The vocabulary's embeddings: from the user's cache when they are there, else
        computed (and kept there when `cache`)."""
        if not cache:
            return self._embed_vocabulary(source, clip_name, vocabulary)
        key = file_key(source, clip=clip_name, vocabulary=vocabulary, templates=VILD_TEMPLATES)
        path = cache_dir() / "ovseg_vocabulary" / f"{key}.pt"
        kept = load_tensors(path)
        emb = kept.get("embeddings") if kept is not None else None
        want = (len(vocabulary), self.arch.embedding_dim)
        if isinstance(emb, Tensor) and tuple(emb.shape) == want:
            log.info("OVSeg vocabulary embeddings (%d names) from the cache %s", len(emb), path)
            return emb
        emb = self._embed_vocabulary(source, clip_name, vocabulary)
        save_tensors(path, {"embeddings": emb.detach().float().cpu(), "vocabulary": vocabulary,
                            "clip": clip_name, "checkpoint": source})  # fmt: skip
        return emb

    def _embed_vocabulary(self, source: str, clip_name: str, vocabulary: list[str]) -> Tensor:
        """The vocabulary through the checkpoint's own CLIP (loaded strictly, then dropped)."""
        clip = ClipModel(quickgelu_name(clip_name))
        clip_state = read_ovseg_clip_state(source)
        clip_state.pop("visual.mask_embedding", None)  # the mask prompt: image side only
        load_state_dict_strict(
            clip.model,
            clip_state,
            source=f"{source} (keys under '{OVSEG_CLIP_PREFIX}')",
            expected=f"OpenAI-layout CLIP weights of open_clip {clip.model_name}",
        )
        return ovseg_text_embeddings(clip.to(self.device), vocabulary)

    @torch.no_grad()
    def segment(self, image: ImageLike, sample: Sample | None = None) -> EntityProposals:
        """(3, H, W) image in [-1, 1] (or PIL) -> query masks at (H, W), best score first."""
        size = image_size(image)
        x, resized = ovseg_preprocess(to_uint8_image(image), self.min_size, self.max_size)
        out = self.model(pixel_values=x.to(self.device))
        scores = object_scores(
            out.class_queries_logits[0], self.text_embeddings, self.void_embedding
        )  # (Q,)
        keep = scores > self.threshold
        probs = upsample_mask_logits(
            out.masks_queries_logits[0, keep], tuple(x.shape[-2:]), resized, size
        )  # (K, H, W)
        return finalize_proposals(
            (probs > self.mask_threshold).cpu(),
            scores[keep].cpu(),
            size,
            min_area_frac=self.min_area_frac,
            max_proposals=self.max_proposals,
        )
