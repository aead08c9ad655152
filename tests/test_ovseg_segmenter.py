"""OVSeg's MaskFormer as an entity segmenter: a tiny random MaskFormer written in OVSeg's
detectron2 layout, loaded strictly, and its proposals against a by-hand post-processing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from semani.alignment.segmenters import build_segmenter, to_uint8_image
from semani.alignment.segmenters.ovseg import (
    OVSEG_PIXEL_MEAN,
    OVSEG_PIXEL_STD,
    VILD_TEMPLATES,
    VOID_KEY,
    OVSegArch,
    OVSegSegmenter,
    build_ovseg_maskformer,
    hf_to_ovseg,
    ovseg_key_map,
    ovseg_preprocess,
)
from semani.modules.clip import CLIP_CONFIG_DIR, TINY_CLIP_NAME, ClipModel
from semani.modules.mask_clip import OVSEG_CLIP_PREFIX
from semani.utils.checkpoint import CheckpointMismatchError
from tests.conftest import CONFIG_DIR

TINY = {  # OVSeg's structure (4 Swin stages, FPN, DETR decoder, MLP class head), tiny widths
    "pretrain_img_size": 64,
    "embed_dim": 16,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 2, 4),
    "window_size": 4,
    "convs_dim": 32,
    "mask_dim": 32,
    "num_classes": 7,
    "embedding_dim": 32,  # the tiny CLIP's joint space
    "embed_hidden_dim": 48,
    "hidden_dim": 32,
    "num_queries": 6,
    "nheads": 2,
    "dim_feedforward": 64,
    "dec_layers": 2,
}
TINY_QUICKGELU = TINY_CLIP_NAME + "-quickgelu"  # OVSeg's CLIP is OpenAI's (QuickGELU)
H, W = 40, 56  # a non-square image; short side 64 -> (64, 90), padded to (64, 96)

# Real OVSeg names (open_vocab_seg: D2SwinTransformer, BasePixelDecoder with adapter_k/layer_k,
# OpenVocabTransformerPredictor over DETR's Transformer of nn.MultiheadAttention, SetCriterion)
# with the shapes OVSeg's code gives them at the TINY widths.
OVSEG_NAMES_TINY = {
    "backbone.patch_embed.proj.weight": (16, 3, 4, 4),
    "backbone.patch_embed.norm.weight": (16,),
    "backbone.layers.0.blocks.1.attn.qkv.weight": (48, 16),  # q, k, v stacked
    "backbone.layers.0.blocks.1.attn.qkv.bias": (48,),
    "backbone.layers.3.blocks.0.attn.relative_position_bias_table": (49, 4),  # (2*4-1)^2 x heads
    "backbone.layers.2.blocks.1.attn.relative_position_index": (16, 16),
    "backbone.layers.2.blocks.1.mlp.fc1.weight": (256, 64),
    "backbone.layers.1.downsample.reduction.weight": (64, 128),  # 4C -> 2C, C = 32
    "backbone.norm0.weight": (16,),  # the output norm of res2
    "backbone.norm3.bias": (128,),
    "sem_seg_head.pixel_decoder.adapter_1.weight": (32, 16, 1, 1),  # lateral conv of res2
    "sem_seg_head.pixel_decoder.adapter_3.weight": (32, 64, 1, 1),  # lateral conv of res4
    "sem_seg_head.pixel_decoder.adapter_2.norm.weight": (32,),  # GroupNorm
    "sem_seg_head.pixel_decoder.layer_4.weight": (32, 128, 3, 3),  # output conv of res5
    "sem_seg_head.pixel_decoder.layer_1.norm.bias": (32,),
    "sem_seg_head.pixel_decoder.mask_features.weight": (32, 32, 3, 3),
    "sem_seg_head.pixel_decoder.mask_features.bias": (32,),
    "sem_seg_head.predictor.query_embed.weight": (6, 32),
    "sem_seg_head.predictor.input_proj.weight": (32, 128, 1, 1),  # res5 -> hidden
    "sem_seg_head.predictor.transformer.decoder.layers.1.self_attn.in_proj_weight": (96, 32),
    "sem_seg_head.predictor.transformer.decoder.layers.0.multihead_attn.in_proj_bias": (96,),
    "sem_seg_head.predictor.transformer.decoder.layers.0.multihead_attn.out_proj.weight": (32, 32),
    "sem_seg_head.predictor.transformer.decoder.layers.1.linear1.weight": (64, 32),
    "sem_seg_head.predictor.transformer.decoder.layers.1.norm3.bias": (32,),
    "sem_seg_head.predictor.transformer.decoder.norm.weight": (32,),
    "sem_seg_head.predictor.mask_embed.layers.2.weight": (32, 32),
    "sem_seg_head.predictor.class_embed.layers.0.weight": (48, 32),  # hidden -> EMBED_HIDDEN_DIM
    "sem_seg_head.predictor.class_embed.layers.1.weight": (32, 48),  # -> EMBEDDING_DIM
    "criterion.empty_weight": (8,),  # NUM_CLASSES + 1
}
# ... and at OVSeg's real size (configs/ovseg_swinB_vitL_bs32_120k.yaml)
OVSEG_NAMES_REAL = {
    "backbone.patch_embed.proj.weight": (128, 3, 4, 4),
    "backbone.layers.2.blocks.17.attn.qkv.weight": (1536, 512),
    "backbone.layers.3.blocks.1.attn.relative_position_bias_table": (529, 32),
    "backbone.layers.2.downsample.reduction.weight": (1024, 2048),
    "backbone.norm3.weight": (1024,),
    "sem_seg_head.pixel_decoder.adapter_1.weight": (256, 128, 1, 1),
    "sem_seg_head.pixel_decoder.layer_4.weight": (256, 1024, 3, 3),
    "sem_seg_head.pixel_decoder.mask_features.weight": (256, 256, 3, 3),
    "sem_seg_head.predictor.query_embed.weight": (100, 256),
    "sem_seg_head.predictor.input_proj.weight": (256, 1024, 1, 1),
    "sem_seg_head.predictor.transformer.decoder.layers.5.multihead_attn.in_proj_weight": (
        768,
        256,
    ),
    "sem_seg_head.predictor.transformer.decoder.layers.5.linear1.weight": (2048, 256),
    "sem_seg_head.predictor.class_embed.layers.0.weight": (1024, 256),
    "sem_seg_head.predictor.class_embed.layers.1.weight": (768, 1024),
    "criterion.empty_weight": (172,),
}


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, H, W, generator=g) * 2 - 1  # (3, H, W) in [-1, 1]


def _random_maskformer(arch: OVSegArch, seed: int = 0) -> nn.Module:
    """OVSeg-shaped MaskFormer with every float tensor perturbed (no zero bias, no unit norm), so
    that a weight in the wrong place changes the output."""
    torch.manual_seed(seed)
    model = build_ovseg_maskformer(arch).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return model


def _ovseg_checkpoint(model: nn.Module, arch: OVSegArch, void: torch.Tensor) -> dict:
    """{"model": ...} in OVSeg's layout: the MaskFormer by the reverse converter, the void, and
    CLIP-adapter parts this segmenter does not use."""
    sd = {k: v.clone() for k, v in hf_to_ovseg(model.state_dict(), arch).items()}
    sd[VOID_KEY] = void.reshape(1, -1).clone()
    sd["clip_adapter.pixel_mean"] = torch.zeros(1, 3, 1, 1)
    return {"model": sd, "iteration": 120000}


@pytest.fixture(scope="module")
def arch() -> OVSegArch:
    return OVSegArch.build(TINY)


@pytest.fixture(scope="module")
def model(arch: OVSegArch) -> nn.Module:
    return _random_maskformer(arch)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> ClipModel:
    """The tiny test CLIP with QuickGELU, registered with open_clip under its -quickgelu name."""
    if TINY_QUICKGELU not in open_clip.list_models():
        cfg = json.loads((CLIP_CONFIG_DIR / f"{TINY_CLIP_NAME}.json").read_text())
        folder = tmp_path_factory.mktemp("clip_configs")
        (folder / f"{TINY_QUICKGELU}.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
        open_clip.add_model_config(folder)
    torch.manual_seed(1)
    return ClipModel(TINY_QUICKGELU)


def _by_hand_input(image: torch.Tensor) -> torch.Tensor:
    """OVSeg's test input of a (3, 40, 56) image with MIN_SIZE_TEST 64: (1, 3, 64, 96)."""
    x = to_uint8_image(image).float()[None]
    x = F.interpolate(x, size=(64, 90), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255)
    x = (x - torch.tensor(OVSEG_PIXEL_MEAN)[:, None, None]) / torch.tensor(OVSEG_PIXEL_STD)[
        :, None, None
    ]
    return F.pad(x, (0, 6, 0, 0))  # zeros right of the image, to a multiple of 32


# -- names and layout -----------------------------------------------------------------------------
def test_key_map_fills_the_model_exactly_with_ovseg_names(arch: OVSegArch, model: nn.Module):
    key_map = ovseg_key_map(arch)
    targets = [d for dsts in key_map.values() for d in dsts]
    assert sorted(targets) == sorted(model.state_dict())  # every model key, each once
    ovseg = hf_to_ovseg(model.state_dict(), arch)
    for name, shape in OVSEG_NAMES_TINY.items():
        assert tuple(ovseg[name].shape) == shape, name
    pixel_decoder = {k.split(".")[2] for k in ovseg if k.startswith("sem_seg_head.pixel_decoder")}
    assert pixel_decoder == {f"adapter_{k}" for k in (1, 2, 3)} | {
        f"layer_{k}" for k in (1, 2, 3, 4)
    } | {"mask_features"}
    assert not any(".transformer.encoder." in k for k in ovseg)  # ENC_LAYERS 0
    assert "backbone.norm" not in {k.rsplit(".", 1)[0] for k in ovseg}  # PROJECTION False


def test_fused_qkv_rows_are_read_as_ovseg_reads_them(arch: OVSegArch, model: nn.Module):
    """Swin's ``attn.qkv`` (OVSeg's WindowAttention, written out) and DETR's
    ``nn.MultiheadAttention`` (torch's own) against transformers' modules after conversion."""
    sd = hf_to_ovseg(model.state_dict(), arch)
    g = torch.Generator().manual_seed(3)

    # window attention of stage 1, block 1: C 32, 2 heads, 4x4 windows
    p, C, heads, N = "backbone.layers.1.blocks.1.attn.", 32, 2, 16
    x = torch.randn(3, N, C, generator=g)  # (windows, N, C)
    qkv = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"])
    q, k, v = qkv.reshape(3, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # (3, nW, nH, N, hd)
    table, index = sd[p + "relative_position_bias_table"], sd[p + "relative_position_index"]
    bias = table[index.view(-1)].view(N, N, heads).permute(2, 0, 1)  # (nH, N, N)
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    ref = F.linear(
        (attn @ v).transpose(1, 2).reshape(3, N, C), sd[p + "proj.weight"], sd[p + "proj.bias"]
    )
    swin = model.model.pixel_level_module.encoder.model.encoder.layers[1].blocks[1].attention
    torch.testing.assert_close(swin(x)[0], ref, atol=1e-5, rtol=1e-4)

    # DETR decoder layer 1: self-attention (query pos on q and k) and cross-attention
    layer = model.model.transformer_module.decoder.layers[1]
    p = "sem_seg_head.predictor.transformer.decoder.layers.1."
    tgt, qpos = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    mem, pos = torch.randn(2, 10, 32, generator=g), torch.randn(2, 10, 32, generator=g)
    for ours, theirs, key, value, key_pos in (
        ("self_attn", layer.self_attn, tgt, tgt, qpos),
        ("multihead_attn", layer.encoder_attn, mem, mem, pos),
    ):
        mha = nn.MultiheadAttention(32, 2, batch_first=True)
        mha.load_state_dict(
            {k[len(p + ours) + 1 :]: v for k, v in sd.items() if k.startswith(p + ours)}
        )
        ref = mha(tgt + qpos, key + key_pos, value, need_weights=False)[0]
        if ours == "self_attn":
            got = theirs(hidden_states=tgt, position_embeddings=qpos)[0]
        else:
            got = theirs(
                hidden_states=tgt,
                key_value_states=mem,
                position_embeddings=qpos,
                encoder_position_embeddings=pos,
            )[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_preprocessing_follows_ovseg_test_resize():
    pixels = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    x, resized = ovseg_preprocess(pixels, min_size=64)
    assert resized == (64, 90) and x.shape == (1, 3, 64, 96)
    assert torch.equal(x[..., 90:], torch.zeros(1, 3, 64, 6))
    assert torch.equal(x, _by_hand_input(pixels))
    # the long side is capped at max_size (detectron2's ResizeShortestEdge)
    x, resized = ovseg_preprocess(torch.zeros(3, 100, 1000, dtype=torch.uint8))
    assert resized == (256, 2560) and x.shape[-2:] == (256, 2560)
    with pytest.raises(ValueError, match="unknown OVSeg architecture keys.*embed_dims"):
        OVSegArch.build({"embed_dims": 16})


# -- loading --------------------------------------------------------------------------------------
def test_checkpoint_loads_strictly_and_names_what_does_not_fit(
    tmp_path: Path, arch: OVSegArch, model: nn.Module, caplog: pytest.LogCaptureFixture
):
    ckpt = _ovseg_checkpoint(model, arch, torch.randn(32))
    torch.save(ckpt, tmp_path / "ovseg.pth")
    text = F.normalize(torch.randn(3, 32), dim=-1)
    with caplog.at_level(logging.DEBUG, logger="semani.alignment.segmenters.ovseg"):
        seg = OVSegSegmenter(tmp_path / "ovseg.pth", arch=TINY, text_embeddings=text)
    loaded = seg.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v), k
    torch.testing.assert_close(seg.void_embedding, ckpt["model"][VOID_KEY])
    assert "not used" in caplog.text and "clip_adapter.pixel_mean" in caplog.text

    def fails(sd: dict, match: str, exc: type[Exception] = CheckpointMismatchError) -> None:
        torch.save({"model": sd}, tmp_path / "bad.pth")
        with pytest.raises(exc, match=match):
            OVSegSegmenter(tmp_path / "bad.pth", arch=TINY, text_embeddings=text)

    gone = "sem_seg_head.predictor.transformer.decoder.layers.1.norm3.bias"
    extra = "sem_seg_head.pixel_decoder.adapter_4.weight"
    fails({k: v for k, v in ckpt["model"].items() if k != gone}, f"1 missing keys: {gone}")
    fails({**ckpt["model"], extra: torch.zeros(1)}, f"1 unexpected keys: {extra}")
    fails({k: v for k, v in ckpt["model"].items() if k != VOID_KEY}, VOID_KEY)
    qkv = "backbone.layers.0.blocks.0.attn.qkv.weight"
    fails({**ckpt["model"], qkv: torch.zeros(45, 16)}, "query.weight")  # mis-shaped: named
    torch.save({"state_dict": ckpt["model"]}, tmp_path / "lightning.pth")
    with pytest.raises(CheckpointMismatchError, match="not an OVSeg"):
        OVSegSegmenter(tmp_path / "lightning.pth", arch=TINY, text_embeddings=text)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):  # the real Swin-B
        OVSegSegmenter(tmp_path / "ovseg.pth", text_embeddings=torch.zeros(2, 768))


# -- proposals ------------------------------------------------------------------------------------
def test_proposals_are_the_models_own_post_processing(
    tmp_path: Path, arch: OVSegArch, model: nn.Module
):
    image = _image()
    with torch.no_grad():
        out = model(pixel_values=_by_hand_input(image))
    emb = out.class_queries_logits[0]  # (Q, D): OVSeg's class head outputs
    # random queries barely differ: the void is query 0's offset from their mean, the two
    # classes those of queries 1 and 2, so that the scores spread
    offsets = F.normalize(emb, dim=-1) - F.normalize(emb, dim=-1).mean(0)  # (Q, D)
    void, text = offsets[0], F.normalize(offsets[1:3], dim=-1)
    torch.save(_ovseg_checkpoint(model, arch, void), tmp_path / "ovseg.pth")

    # by hand: OVSeg's logits 100 * cos(query, [text; void]); object score = 1 - p(void)
    q = emb / emb.norm(dim=-1, keepdim=True)
    classes = torch.cat([text, (void / void.norm())[None]])
    scores = 1 - torch.softmax(100 * q @ classes.T, dim=-1)[:, -1]  # (Q,)
    threshold = float(scores.median())
    keep = scores > threshold
    assert 0 < keep.sum() < len(scores) and scores.max() - scores.min() > 0.1
    logits = out.masks_queries_logits[:, keep]  # (1, K, 16, 24)
    up = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)[..., :64, :90]
    probs = F.interpolate(up, size=(H, W), mode="bilinear", align_corners=False)[0].sigmoid()
    masks, kept_scores = probs > 0.45, scores[keep]
    nonempty = masks.flatten(1).any(1)
    order = torch.argsort(kept_scores[nonempty], descending=True, stable=True)
    want_masks, want_scores = masks[nonempty][order], kept_scores[nonempty][order]

    seg = OVSegSegmenter(
        tmp_path / "ovseg.pth",
        threshold=threshold,
        mask_threshold=0.45,
        max_proposals=None,
        text_embeddings=text,
        min_size=64,
        arch=TINY,
    )
    props = seg.segment(image)
    assert len(props) == len(want_masks) > 0 and props.names is None
    assert torch.equal(props.masks, want_masks)
    torch.testing.assert_close(props.scores, want_scores)
    pil = Image.fromarray(to_uint8_image(image).permute(1, 2, 0).numpy())
    assert torch.equal(seg.segment(pil).masks, props.masks)
    seg.max_proposals, seg.min_area_frac = 1, 0.0
    assert torch.equal(seg.segment(image).masks, want_masks[:1])


def test_vocabulary_is_embedded_with_the_checkpoints_clip_through_the_config(
    tmp_path: Path, arch: OVSegArch, model: nn.Module, tiny_clip: ClipModel
):
    """configs/alignment/segmenter/ovseg.yaml with the tiny architecture and CLIP: the class
    names go through the checkpoint's CLIP with OVSeg's ViLD templates (averaged, normalised)."""
    ckpt = _ovseg_checkpoint(model, arch, torch.randn(32))
    for k, v in tiny_clip.model.state_dict().items():
        ckpt["model"][OVSEG_CLIP_PREFIX + k] = v.clone()
    ckpt["model"][OVSEG_CLIP_PREFIX + "visual.mask_embedding"] = torch.zeros(3, 16, 64)
    path = tmp_path / "ovseg" / "ovseg_swinbase_vitL14_ft_mpt.pth"  # the config's default path
    path.parent.mkdir()
    torch.save(ckpt, path)

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    arch_override = json.dumps(TINY).replace('"', "").replace(" ", "")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            overrides=[
                "+alignment/segmenter=ovseg",
                "+paths=default",
                f"paths.pretrained_dir={tmp_path}",
                f"alignment.segmenter.clip_model_name={TINY_QUICKGELU}",
                "alignment.segmenter.vocabulary=[bird,tree]",
                "alignment.segmenter.min_size=64",
                f"+alignment.segmenter.arch={arch_override}",
            ]
        )
    seg = build_segmenter(cfg.alignment.segmenter)
    assert isinstance(seg, OVSegSegmenter) and seg.vocabulary == ["bird", "tree"]
    with torch.no_grad():
        per_template = [
            tiny_clip.encode_text([t.format(n) for n in ("bird", "tree")]) for t in VILD_TEMPLATES
        ]
    want = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(seg.text_embeddings, want)
    props = seg.segment(_image(1))
    assert props.masks.shape[1:] == (H, W) and len(props) <= 5  # the config's max_proposals


# -- OVSeg's real size ----------------------------------------------------------------------------
@pytest.mark.slow
def test_real_swin_b_maskformer_loads_strictly_and_segments(tmp_path: Path):
    arch = OVSegArch()  # configs/ovseg_swinB_vitL_bs32_120k.yaml
    torch.manual_seed(0)
    model = build_ovseg_maskformer(arch).eval()
    assert sorted(d for ds in ovseg_key_map(arch).values() for d in ds) == sorted(
        model.state_dict()
    )
    ckpt = _ovseg_checkpoint(model, arch, torch.randn(768))
    for name, shape in OVSEG_NAMES_REAL.items():
        assert tuple(ckpt["model"][name].shape) == shape, name
    torch.save(ckpt, tmp_path / "ovseg_swinbase_vitL14_ft_mpt.pth")
    del ckpt

    text = F.normalize(torch.randn(4, 768), dim=-1)
    seg = OVSegSegmenter(
        tmp_path / "ovseg_swinbase_vitL14_ft_mpt.pth", threshold=0.0, text_embeddings=text
    )
    for k, v in model.state_dict().items():
        assert torch.equal(seg.model.state_dict()[k], v), k
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    props = seg.segment(image)  # resized to 640 x 640, as OVSeg's test input
    assert props.masks.shape[1:] == (256, 256) and len(props) <= 5
    assert torch.all(props.scores[:-1] >= props.scores[1:])


def test_vocabulary_embeddings_are_kept_in_the_users_cache(
    tmp_path: Path, arch: OVSegArch, model: nn.Module, tiny_clip: ClipModel, monkeypatch
):
    """A second segmenter of the same checkpoint and names reads the embeddings from
    $SEMANI_CACHE_DIR instead of running the CLIP; other names, another checkpoint file, an
    unreadable entry or cache_vocabulary=False compute them."""
    ckpt = _ovseg_checkpoint(model, arch, torch.randn(32))
    for k, v in tiny_clip.model.state_dict().items():
        ckpt["model"][OVSEG_CLIP_PREFIX + k] = v.clone()
    path = tmp_path / "ovseg.pth"
    torch.save(ckpt, path)
    monkeypatch.setenv("SEMANI_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    embed = OVSegSegmenter._embed_vocabulary

    def counted(self, *args):
        calls.append(args[-1])
        return embed(self, *args)

    monkeypatch.setattr(OVSegSegmenter, "_embed_vocabulary", counted)

    def build(names, **kw):
        return OVSegSegmenter(path, arch=TINY, clip_model_name=TINY_QUICKGELU, vocabulary=names,
                              min_size=64, **kw)  # fmt: skip

    first = build(["bird", "tree"])
    entries = list((tmp_path / "cache" / "ovseg_vocabulary").glob("*.pt"))
    assert len(entries) == 1 and calls == [["bird", "tree"]]
    second = build(["bird", "tree"])
    assert calls == [["bird", "tree"]]  # not embedded again
    torch.testing.assert_close(second.text_embeddings, first.text_embeddings)
    build(["bird", "sky"])
    assert calls[-1] == ["bird", "sky"] and len(calls) == 2
    entries[0].write_bytes(b"not a torch file")  # a broken entry: computed and rewritten
    torch.testing.assert_close(build(["bird", "tree"]).text_embeddings, first.text_embeddings)
    assert len(calls) == 3
    build(["bird", "tree"])  # and read back
    assert len(calls) == 3
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    build(["bird", "tree"])  # the checkpoint was replaced: computed again
    assert len(calls) == 4
    before = sorted(p.name for p in (tmp_path / "cache" / "ovseg_vocabulary").iterdir())
    build(["owl"], cache_vocabulary=False)
    build(["owl"], cache_vocabulary=False)
    assert len(calls) == 6
    assert sorted(p.name for p in (tmp_path / "cache" / "ovseg_vocabulary").iterdir()) == before


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    from semani.utils.disk_cache import cache_dir, file_key

    monkeypatch.setenv("SEMANI_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEMANI_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "semani"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "semani"
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    assert file_key(f, n=1) == file_key(f, n=1) != file_key(f, n=2)
