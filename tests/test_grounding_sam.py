"""GroundingDINO + SAM on tiny random transformers models saved to disk: the segmenter, the word
reaching GroundingDINO through `EntityAligner` and the alignment study, the thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from semani.alignment import EntityAligner
from semani.alignment.segmenters import SEGMENTERS, ModelNotFoundError, build_segmenter
from semani.alignment.segmenters.grounding_sam import GroundingSamSegmenter, caption
from semani.alignment.study import run_study
from semani.alignment.types import EntityNotFoundError, EntityProposals
from tests.conftest import compose
from tests.test_segmenters import H, W, _check, _compose, _image, tiny_sam

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "object", "bird", "dog", "cat"]


def tiny_grounding_dino(folder: Path) -> Path:
    """A random GroundingDINO (tiny Swin, 1-layer BERT, 8 queries) + processor saved to
    ``folder``; the processor's BERT tokenizer is read from a vocab file of ``VOCAB``."""
    from transformers import (
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    backbone = SwinConfig(
        image_size=64,
        window_size=7,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        out_indices=[2, 3, 4],
    )
    text = {"model_type": "bert", "vocab_size": len(VOCAB), "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 16}  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        text_config=text,
        d_model=32,  # GroupNorm(32, d_model) in the input projections
        encoder_layers=1,
        decoder_layers=2,  # the box heads of layers 1.. are tied to layer 0's
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=8,
        max_text_len=16,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grounding_sam")
    return tiny_grounding_dino(root / "gdino"), tiny_sam(root / "sam")


@pytest.fixture(scope="module")
def segmenter(models: tuple[Path, Path]) -> GroundingSamSegmenter:
    # random weights: every query scores about sigmoid(0) or more, so the box threshold is opened
    gdino, sam = models
    return build_segmenter(
        "grounding_sam", grounding_model=gdino, sam_model=sam, box_threshold=0.0,
        boxes_per_batch=3,
    )  # fmt: skip


class ProcessorSpy:
    """Wraps the GroundingDINO processor and records the text of every call."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.texts = inner, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.texts.append(kwargs.get("text"))
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def spy(segmenter: GroundingSamSegmenter, monkeypatch: pytest.MonkeyPatch) -> ProcessorSpy:
    spy = ProcessorSpy(segmenter.grounding_processor)
    monkeypatch.setattr(segmenter, "grounding_processor", spy)
    return spy


class WordScorer:
    """Records the words it is asked about; the similarity is the proposal's own score."""

    selection, threshold = "argmax", None

    def __init__(self) -> None:
        self.words: list[str] = []

    def __call__(self, image, proposals, word):
        self.words.append(word)
        return proposals.scores.clone().float()


def _halves(k: int) -> EntityProposals:
    """Two proposals (left and right halves), the k-th scored best."""
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, :, : W // 2] = True
    masks[1, :, W // 2 :] = True
    scores = torch.tensor([0.9, 0.5]) if k == 0 else torch.tensor([0.5, 0.9])
    return EntityProposals(masks, scores)


class PlainSegmenter:
    """The segmenter contract without a word: passing one would be a TypeError."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def segment(self, image, sample=None):
        self.calls.append((image, sample))
        return _halves(0)


class WordSegmenter:
    """A text-conditioned fake: "dog" prefers the right half, anything else the left."""

    text_conditioned = True

    def __init__(self) -> None:
        self.words: list[str | None] = []

    def segment(self, image, sample=None, word=None):
        self.words.append(word)
        return _halves(1 if word == "dog" else 0)


# -- the segmenter --------------------------------------------------------------------------------
def test_grounding_sam_from_config(models: tuple[Path, Path]) -> None:
    gdino, sam = models
    assert SEGMENTERS["grounding_sam"].endswith("GroundingSamSegmenter")
    cfg = _compose(
        "grounding_sam",
        gdino.parent,
        [f"grounding_model={gdino}", f"sam_model={sam}", "box_threshold=0", "min_area_frac=0"],
    )
    seg = build_segmenter(cfg)
    assert isinstance(seg, GroundingSamSegmenter) and seg.text_conditioned
    props = seg.segment(_image(), word="bird")
    _check(props)  # (K, H, W) bool at the image's size, best first, none empty
    assert 0 < len(props) <= cfg.max_proposals
    assert props.names is not None and all(isinstance(n, str) for n in props.names)
    # the proposal scores are GroundingDINO's box scores
    from semani.alignment.segmenters.common import to_uint8_image

    boxes, scores, _ = seg.detect(to_uint8_image(_image()), "bird")
    assert len(boxes) == 8 and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert (boxes[:, 0::2] <= W).all() and (boxes[:, 1::2] <= H).all() and (boxes >= 0).all()
    assert all(torch.isclose(scores, s).any() for s in props.scores)
    # a PIL image gives the same proposals; the cap holds
    from PIL import Image

    pil = Image.fromarray(to_uint8_image(_image()).permute(1, 2, 0).numpy())
    assert torch.equal(seg.segment(pil, word="bird").masks, props.masks)
    capped = build_segmenter(cfg, max_proposals=2).segment(_image(), word="bird")
    _check(capped)
    assert torch.equal(capped.masks, props.masks[:2])


def test_word_reaches_grounding_dino(segmenter: GroundingSamSegmenter, spy: ProcessorSpy) -> None:
    segmenter.segment(_image(), word="Bird")
    segmenter.segment(_image())  # no word: the generic caption
    assert spy.texts == [["bird."], ["object."]]
    tokenizer = spy.inner.tokenizer
    assert tokenizer("bird.")["input_ids"] == [2, VOCAB.index("bird"), VOCAB.index("."), 3]
    # the caption conditions the detection
    from semani.alignment.segmenters.common import to_uint8_image

    pixels = to_uint8_image(_image())
    bird, dog = segmenter.detect(pixels, "bird"), segmenter.detect(pixels, "dog")
    assert not torch.equal(bird[0], dog[0]) or not torch.equal(bird[1], dog[1])
    assert caption(" A Dog ") == "a dog." and caption("cat.") == "cat."
    with pytest.raises(ValueError, match="word"):
        GroundingSamSegmenter("unused", "unused", prompt_template="a thing")


def test_box_threshold_one_gives_no_proposals(models: tuple[Path, Path]) -> None:
    gdino, sam = models
    seg = build_segmenter("grounding_sam", grounding_model=gdino, sam_model=sam, box_threshold=1.0)
    none = seg.segment(_image(), word="bird")
    _check(none)
    assert len(none) == 0
    aligner = EntityAligner(WordScorer(), seg)
    with pytest.raises(EntityNotFoundError, match="proposed no entities"):
        aligner.align(_image(), "bird")


def test_missing_weights_are_a_clear_error(
    tmp_path: Path, models: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    gdino, sam = models
    with pytest.raises(ModelNotFoundError, match="nowhere.*grounding-dino-tiny"):
        build_segmenter("grounding_sam", grounding_model=tmp_path / "nowhere", sam_model=sam)
    with pytest.raises(ModelNotFoundError, match="nowhere.*sam-vit-base"):
        build_segmenter("grounding_sam", grounding_model=gdino, sam_model=tmp_path / "nowhere")
    # the former allow_download is ignored, with a warning
    with pytest.warns(FutureWarning, match="allow_download"), pytest.raises(ModelNotFoundError):
        build_segmenter("grounding_sam", grounding_model=tmp_path / "nowhere", sam_model=sam,
                        allow_download=True)  # fmt: skip
    # offline, a hub id absent from the cache names the key that takes a folder instead
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="pass grounding_model="):
        build_segmenter("grounding_sam", grounding_model="IDEA-Research/grounding-dino-tiny",
                        sam_model=sam)  # fmt: skip


# -- EntityAligner and the alignment study --------------------------------------------------------
def test_aligner_passes_the_word(segmenter: GroundingSamSegmenter, spy: ProcessorSpy) -> None:
    scorer = WordScorer()
    aligner = EntityAligner(scorer, segmenter)
    result = aligner.align(_image(), "dog")
    assert spy.texts == [["dog."]] and scorer.words == ["dog"]
    assert result.chosen == [0]  # the best box score
    aligner.propose(_image())  # no word: the generic caption
    assert spy.texts[-1] == ["object."]
    # given proposals: nothing is segmented
    aligner.align(_image(), "cat", proposals=_halves(0))
    assert len(spy.texts) == 2


def test_plain_segmenter_keeps_the_old_call() -> None:
    plain = PlainSegmenter()
    aligner = EntityAligner(WordScorer(), plain)
    image = _image()
    aligner.align(image, "bird")
    aligner.align_many(image, "bird: a red bird | dog: a dog | bird: a blue bird")
    assert len(plain.calls) == 2  # once per align, once per align_many
    assert all(len(c) == 2 and c[1] is None for c in plain.calls)


def test_align_many_segments_once_per_word() -> None:
    worded = WordSegmenter()
    scorer = WordScorer()
    aligner = EntityAligner(scorer, worded)
    found = aligner.align_many(_image(), "bird: a red bird | dog: a dog | bird: a blue bird")
    assert worded.words == ["bird", "dog"] and scorer.words == ["bird", "dog"]
    bird1, dog, bird2 = (e.result for e in found)
    assert bird1.chosen == [0] and dog.chosen == [1]  # each word on its own proposals
    assert bird2.chosen == [1]  # the bird taken first is not offered again
    assert bird1.proposals is bird2.proposals and dog.proposals is not bird1.proposals
    # given proposals are shared by every word, as for any segmenter
    aligner.align_many(_image(), "bird: x | dog: y", proposals=_halves(0))
    assert worded.words == ["bird", "dog"]


def test_study_segments_per_prompt() -> None:
    masks = torch.zeros(2, H, W)
    masks[0, :, : W // 2] = 1
    masks[1, :, W // 2 :] = 1
    sample = {"image": _image(), "entity_masks": masks, "entity_names": ["bird", "dog"],
              "index": 0}  # fmt: skip
    worded, plain = WordSegmenter(), PlainSegmenter()
    records = run_study(
        [sample], {"worded": worded.segment, "plain": plain.segment}, {"best": WordScorer()}
    )
    assert worded.words == ["bird", "dog"] and len(plain.calls) == 1
    correct = {(r.segmenter, r.word): r.correct for r in records}
    # the word-conditioned proposals put each word's entity first; the plain ones the left half
    assert correct == {("worded", "bird"): 1.0, ("worded", "dog"): 1.0,
                       ("plain", "bird"): 1.0, ("plain", "dog"): 0.0}  # fmt: skip


def test_coco_study_entry_is_off_by_default() -> None:
    cfg = compose("eval.yaml", ["protocol=alignment", "data=coco"])
    entry = cfg.study.segmenters.grounding_sam
    assert entry.enabled is False and entry._target_.endswith("GroundingSamSegmenter")
    on = compose("eval.yaml", ["protocol=alignment", "data=coco", "study.grounding_sam=true"])
    assert on.study.segmenters.grounding_sam.enabled is True


class NoEditor:
    """The editor contract, never called here."""

    token_grid, min_tokens = (2, 2), 1

    def edit(self, image, mask, text, seed=None):
        raise AssertionError("not called")


def test_pipeline_proposes_per_word() -> None:
    from semani.pipeline import EntityEditPipeline

    worded = WordSegmenter()
    pipeline = EntityEditPipeline(EntityAligner(WordScorer(), worded), NoEditor())
    assert pipeline.text_conditioned
    shown = pipeline.propose(_image(), word="dog")  # the app's gallery for "dog"
    assert worded.words == ["dog"] and shown.scores.argmax() == 1
    plain = EntityEditPipeline(EntityAligner(WordScorer(), PlainSegmenter()), NoEditor())
    assert not plain.text_conditioned
    plain.propose(_image(), word="dog")  # a plain segmenter is called without it
