"""Entity segmenters on tiny random transformers models saved to disk, and their shared rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semani.alignment.segmenters import (
    GroundTruthSegmenter,
    ModelNotFoundError,
    build_segmenter,
    finalize_proposals,
    mask_containment,
    mask_iou,
    resize_masks,
    suppress_overlaps,
    to_uint8_image,
)
from semani.alignment.types import EntityProposals
from tests.conftest import CONFIG_DIR

H, W = 48, 80  # a non-square image


def _image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, H, W, generator=g) * 2 - 1  # (3, H, W) in [-1, 1]


def _check(props: EntityProposals, size: tuple[int, int] = (H, W)) -> None:
    assert isinstance(props, EntityProposals)
    assert props.masks.dtype == torch.bool and props.masks.shape[1:] == size
    assert props.size == size
    assert torch.all(props.scores[:-1] >= props.scores[1:])  # best first
    assert props.masks.flatten(1).any(1).all()  # no empty proposal


# -- tiny models on disk --------------------------------------------------------------------------
def tiny_mask2former(folder: Path, entity_bias: float = 4.0) -> Path:
    """A random one-class ("entity") Mask2Former + image processor saved to ``folder``."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=8,
        id2label={0: "entity"},
        label2id={"entity": 0},
    )
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        # random weights predict "no object" and masks of probability ~0.5 everywhere: make
        # every query an entity with a sharp mask, so that segments come out
        model.class_predictor.bias.copy_(torch.tensor([entity_bias, -entity_bias]))
        model.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule(
            "2.0"
        ).weight *= 300
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(
        folder
    )
    return folder


def tiny_sam(folder: Path) -> Path:
    """A random SAM (64 px input, 8 px patches) + processor saved to ``folder``."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
            mlp_dim=64,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32
        ),
    )
    SamModel(config).save_pretrained(folder)
    processor = SamImageProcessor(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    SamProcessor(processor).save_pretrained(folder)
    return folder


def tiny_oneformer(folder: Path) -> Path:
    """A random one-class OneFormer + processor (image processor and a vocabulary-less CLIP
    tokenizer for the task token) saved to ``folder``."""
    from transformers import (
        CLIPTokenizer,
        OneFormerConfig,
        OneFormerForUniversalSegmentation,
        OneFormerImageProcessor,
        OneFormerProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer()  # 3 special tokens; every word is unknown, enough for a test
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = OneFormerConfig(
        backbone_config=backbone,
        num_queries=8,
        conv_dim=32,
        mask_dim=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        text_encoder_width=32,
        text_encoder_num_layers=1,
        text_encoder_vocab_size=len(tokenizer.get_vocab()),
        text_encoder_context_length=16,
        task_seq_len=16,
        text_encoder_n_ctx=4,
        id2label={0: "entity"},
        label2id={"entity": 0},
    )
    model = OneFormerForUniversalSegmentation(config)
    decoder = model.model.transformer_module.decoder
    with torch.no_grad():  # as in tiny_mask2former: entities with sharp masks
        decoder.class_embed.bias.copy_(torch.tensor([4.0, -4.0]))
        decoder.mask_embed.get_submodule("layers.2.0").weight *= 300
    model.save_pretrained(folder)
    image_processor = OneFormerImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 128},
        num_labels=1,
        metadata={"0": "entity", "thing_ids": [0], "class_names": ["entity"]},
    )
    OneFormerProcessor(
        image_processor, tokenizer, max_seq_length=16, task_seq_length=16
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny")


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sam(tmp_path_factory.mktemp("sam") / "tiny")


def _compose(name: str, pretrained_dir: Path, overrides: list[str] | None = None):
    """configs/alignment/segmenter/<name>.yaml composed as a group, with the real paths group.

    ``overrides`` are keys of the segmenter ("threshold=0.1").
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import semani.utils.resolvers  # noqa: F401  (registers ${semani.abspath:})

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            overrides=[
                f"+alignment/segmenter={name}",
                "+paths=default",
                f"paths.pretrained_dir={pretrained_dir}",
                *(f"alignment.segmenter.{o}" for o in overrides or []),
            ]
        )
    return cfg.alignment.segmenter


# -- backends -------------------------------------------------------------------------------------
def test_mask2former_from_config(m2f_dir: Path) -> None:
    # random masks overlap a lot: any query that wins pixels becomes a segment
    cfg = _compose(
        "mask2former",
        m2f_dir.parent,
        [f"model_name_or_path={m2f_dir}", "overlap_mask_area_threshold=0"],
    )
    seg = build_segmenter(cfg, threshold=0.1)
    props = seg.segment(_image())
    _check(props)
    assert len(props) > 0 and props.names is None
    # panoptic segments do not overlap
    assert props.masks.sum(0).max() <= 1
    # a PIL image works the same
    from PIL import Image

    pil = Image.fromarray(to_uint8_image(_image()).permute(1, 2, 0).numpy())
    same = seg.segment(pil)
    assert torch.equal(same.masks, props.masks)


def test_oneformer_through_the_same_segmenter(tmp_path: Path) -> None:
    folder = tiny_oneformer(tmp_path / "oneformer")
    seg = build_segmenter(
        "mask2former", model_name_or_path=folder, threshold=0.1, overlap_mask_area_threshold=0
    )
    assert seg.is_oneformer
    props = seg.segment(_image())
    _check(props)
    assert len(props) > 0


def test_mask2former_cap_and_min_area(m2f_dir: Path) -> None:
    seg = build_segmenter(
        "mask2former", model_name_or_path=m2f_dir, overlap_mask_area_threshold=0, max_proposals=2
    )
    props = seg.segment(_image(1))
    _check(props)
    assert len(props) <= 2
    big = build_segmenter("mask2former", model_name_or_path=m2f_dir, min_area_frac=1.01)
    assert len(big.segment(_image(1))) == 0
    sure = build_segmenter("mask2former", model_name_or_path=m2f_dir, threshold=1.0)
    _check(none := sure.segment(_image(1)))  # no query kept
    assert len(none) == 0


def test_panoptic_segments_keep_only_their_own_mask() -> None:
    """Mask2Former's rule: a segment is the pixels its query won AND its own mask; background
    that no query covers stays out (transformers' post-processing hands it to some segment)."""
    from types import SimpleNamespace

    from semani.alignment.segmenters.mask2former import panoptic_proposals

    logits = torch.full((1, 3, 8, 8), -10.0)  # (B, Q, h, w)
    logits[0, 0, :4, :4] = 10.0  # entity A, top left
    logits[0, 1, 4:, 4:] = 10.0  # entity B, bottom right
    logits[0, 2] = 10.0  # everything, but "no object"
    classes = torch.tensor([[[5.0, -5.0], [3.0, -3.0], [-5.0, 5.0]]])  # (B, Q, 1 + no-object)
    outputs = SimpleNamespace(class_queries_logits=classes, masks_queries_logits=logits)
    (props,) = panoptic_proposals(outputs, [(16, 32)])
    assert len(props) == 2 and props.size == (16, 32)
    assert props.scores[0] > props.scores[1]  # A (p = 0.99995) before B
    a, b = props.masks
    # each segment is its query's quadrant (up to the bilinear upsampling's rounded corner) ...
    assert a[:8, :16].sum() >= 0.95 * 8 * 16 and a.sum() == a[:8, :16].sum()
    assert b[8:, 16:].sum() >= 0.95 * 8 * 16 and b.sum() == b[8:, 16:].sum()
    # ... and the other two quadrants are in no segment
    assert not props.masks[:, :8, 16:].any() and not props.masks[:, 8:, :16].any()
    (none,) = panoptic_proposals(outputs, [(16, 32)], threshold=0.99999)
    assert len(none) == 0


def test_sam_from_config(sam_dir: Path) -> None:
    # random weights: predicted IoUs and stabilities are arbitrary, so the filters are opened
    cfg = _compose(
        "sam",
        sam_dir.parent,
        [
            f"model_name_or_path={sam_dir}",
            "points_per_side=4",
            "points_per_batch=5",
            "pred_iou_thresh=-1e9",
            "stability_score_thresh=-1",
            "min_area_frac=0",
        ],
    )
    seg = build_segmenter(cfg)
    props = seg.segment(_image())
    _check(props)
    assert 0 < len(props) <= cfg.max_proposals
    # the survivors obey the NMS rules
    iou = mask_iou(props.masks, props.masks).fill_diagonal_(0)
    assert iou.max() <= cfg.nms_iou_thresh + 1e-6
    # and the strict default filters leave a subset
    strict = build_segmenter("sam", model_name_or_path=sam_dir, points_per_side=4)
    _check(strict.segment(_image()))


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for name in ("mask2former", "sam"):
        with pytest.raises(ModelNotFoundError, match="nowhere") as err:
            build_segmenter(name, model_name_or_path=missing)
        msg = str(err.value)
        assert "scripts/download_weights.py --only" in msg and "\n" not in msg


def test_entityseg_without_detectron2_says_how_to_install(tmp_path: Path) -> None:
    # here detectron2 is absent; with it, the default repo_dir (no CropFormer clone) fails the
    # same way, with the same instructions
    cfg = _compose("entityseg", tmp_path)
    with pytest.raises(ImportError) as err:
        build_segmenter(cfg)
    msg = str(err.value)
    assert "detectron2" in msg and "Entity/EntitySeg" in msg and "entity_swin_lw7_3x" in msg
    assert str(tmp_path / "entityseg") in msg  # where the weights go


def test_entityseg_v1_keeps_proposals_as_the_authors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1 calls the model on the image itself (BGR uint8, CHW, its own size), keeps
    every proposal at or above the confidence (0.0), the best one always, at most 5."""
    from types import SimpleNamespace

    from semani.alignment.segmenters import entityseg

    scores = torch.tensor([0.9, -0.1, 0.3, 0.05, 0.2, 0.1, 0.01])
    masks = torch.zeros(7, 8, 12, dtype=torch.bool)
    for k in range(7):
        masks[k, k : k + 2, :] = True
    calls = []

    def model(inputs):
        calls.append(inputs)
        inst = SimpleNamespace(pred_masks=masks, scores=scores)
        inst.to = lambda device: inst
        return [{"instances": inst}]

    monkeypatch.setattr(entityseg, "_build_model", lambda *a: model)
    seg = entityseg.EntitySegSegmenter(repo_dir=None, weights="w.pth")
    image = torch.zeros(3, 8, 12)
    image[0] = 1.0  # red
    props = seg.segment(image)
    (inputs,) = calls
    assert inputs[0]["height"] == 8 and inputs[0]["width"] == 12
    assert inputs[0]["image"].dtype == torch.uint8 and inputs[0]["image"][2].eq(255).all()  # BGR
    assert props.scores.tolist() == pytest.approx([0.9, 0.3, 0.2, 0.1, 0.05])  # -0.1 dropped
    negative = torch.tensor([-0.5, -0.2])  # nothing reaches 0.0: the best is kept anyway
    monkeypatch.setattr(entityseg, "_build_model", lambda *a: lambda inputs: [{"instances":
        SimpleNamespace(pred_masks=masks[:2], scores=negative, to=lambda d: SimpleNamespace(
            pred_masks=masks[:2], scores=negative))}])  # fmt: skip
    seg = entityseg.EntitySegSegmenter(repo_dir=None, weights="w.pth")
    assert seg.segment(image).scores.tolist() == pytest.approx([-0.2])


def test_ground_truth_shapes(shapes_root: Path) -> None:
    from semani.data.shapes import ShapesWorldDataset

    ds = ShapesWorldDataset(shapes_root, split="test", image_size=64)
    sample = ds[0]
    seg = build_segmenter(_compose("ground_truth", shapes_root))
    props = seg.segment(sample["image"], sample=sample)
    _check(props, (64, 64))
    assert props.names == sample["entity_names"]
    assert torch.equal(props.masks, sample["entity_masks"].bool())
    assert torch.all(props.scores == 1)
    # bound to a data set: by index, and at another image size
    by_index = GroundTruthSegmenter(dataset=ds).segment(torch.zeros(3, 32, 32), index=0)
    _check(by_index, (32, 32))
    assert by_index.names == sample["entity_names"]
    # explicit masks
    explicit = seg.segment(
        sample["image"], entity_masks=sample["entity_masks"], entity_names=["a"] * len(props)
    )
    assert explicit.names == ["a"] * len(props)
    # bound to one sample: a drop-in segment(image)
    bound = GroundTruthSegmenter.from_sample(sample, max_proposals=1)
    assert bound.segment(sample["image"]).names == sample["entity_names"][:1]
    with pytest.raises(KeyError, match="entity_masks"):
        seg.segment(sample["image"], sample={"image": sample["image"]})
    with pytest.raises(ValueError, match="entity_masks, sample or index"):
        seg.segment(sample["image"])


# -- shared post-processing rules -----------------------------------------------------------------
def _box(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (10, 10)) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_and_containment() -> None:
    a = torch.stack([_box(0, 4, 0, 4), _box(0, 2, 0, 2)])
    b = torch.stack([_box(0, 4, 0, 4), _box(6, 10, 6, 10)])
    iou, inside = mask_iou(a, b), mask_containment(a, b)
    assert iou.shape == (2, 2) and iou[0, 0] == 1 and iou[0, 1] == 0
    assert iou[1, 0] == pytest.approx(4 / 16) and inside[1, 0] == 1


def test_suppress_overlaps_rules() -> None:
    whole = _box(0, 6, 0, 6)  # 36 px
    duplicate = _box(0, 6, 0, 5)  # IoU 30/36 with whole
    part = _box(0, 3, 0, 3)  # inside whole
    other = _box(7, 10, 7, 10)
    masks = torch.stack([part, whole, duplicate, other])
    # the whole outranks its part and its duplicate: both go
    keep = suppress_overlaps(masks, torch.tensor([0.5, 0.9, 0.8, 0.7]), 0.7, 0.9)
    assert keep.tolist() == [1, 3]
    # a part ranked first does not hide its whole (the whole is not inside the part)
    keep = suppress_overlaps(masks, torch.tensor([0.95, 0.9, 0.8, 0.7]), 0.7, 0.9)
    assert keep.tolist() == [0, 1, 3]
    # containment off: the part stays; a high IoU threshold keeps the duplicate
    keep = suppress_overlaps(masks, torch.tensor([0.5, 0.9, 0.8, 0.7]), 0.9, None)
    assert keep.tolist() == [1, 2, 3, 0]
    assert suppress_overlaps(masks[:0], torch.zeros(0)).numel() == 0


def test_finalize_proposals_rules() -> None:
    masks = torch.stack(
        [
            _box(0, 1, 0, 2),
            _box(0, 5, 0, 5),
            torch.zeros(10, 10, dtype=torch.bool),
            _box(5, 10, 0, 10),
        ]
    )
    scores = torch.tensor([0.9, 0.2, 0.99, 0.6])
    out = finalize_proposals(masks, scores, (10, 10), ["tiny", "mid", "empty", "big"], 0.05)
    assert out.names == ["big", "mid"]  # tiny (2% < 5%) and empty dropped, sorted by score
    assert out.scores.tolist() == pytest.approx([0.6, 0.2])
    capped = finalize_proposals(masks, scores, (10, 10), None, 0.0, max_proposals=2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.6])
    # resized to the image's size (nearest for bool, threshold 0.5 for probabilities)
    up = finalize_proposals(masks[1:2], scores[1:2], (20, 40))
    assert up.size == (20, 40) and up.masks.sum() == 10 * 20  # 5 x 5 px -> 10 x 20 px
    soft = torch.zeros(1, 10, 10)
    soft[0, :5] = 0.8
    assert finalize_proposals(soft, torch.ones(1), (10, 10)).masks.sum() == 50
    assert resize_masks(masks[:0], (3, 4)).shape == (0, 3, 4)
    assert len(finalize_proposals(masks[:0], scores[:0], (10, 10))) == 0


def test_to_uint8_image() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 5)
    out = to_uint8_image(x)
    assert out.dtype == torch.uint8 and out.shape == (3, 2, 5)
    assert out[:, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError):
        to_uint8_image(torch.zeros(1, 4, 4))
