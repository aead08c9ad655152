"""Semantic alignment: mask-prompt CLIP, token-wise scorer, aligner selection, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semani.alignment import (
    EntityAligner,
    EntityNotFoundError,
    EntityProposals,
    MaskedCropClipScorer,
    MaskPromptScorer,
    TokenWiseScorer,
    parse_entity_edits,
)
from semani.alignment.token_scorer import entity_token_scores, word_token_features
from semani.modules.clip import TINY_CLIP_NAME, ClipModel
from semani.modules.mask_clip import (
    OVSEG_CLIP_PREFIX,
    MaskPromptCLIP,
    masked_crops,
    patch_foreground,
    quickgelu_name,
)
from semani.utils.checkpoint import CheckpointMismatchError
from semani.utils.masks import mask_to_token_mask
from tests.conftest import CONFIG_DIR

# the tiny CLIP: 32 px input, patch 8 -> a 4 x 4 grid, width 64, 2 blocks, embed 32


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    torch.manual_seed(0)
    return ClipModel(TINY_CLIP_NAME)


@pytest.fixture(scope="module")
def mask_clip(clip: ClipModel) -> MaskPromptCLIP:
    model = MaskPromptCLIP(clip=clip, depth=3)  # input, after block 1, after block 2 (the last)
    with torch.no_grad():
        model.mask_embedding.copy_(torch.randn(model.mask_embedding.shape, generator=_gen(1)))
    return model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _proposals(masks: torch.Tensor) -> EntityProposals:
    return EntityProposals(masks, torch.linspace(1.0, 0.5, masks.shape[0]))


# ---------------------------------------------------------------- mask-prompt CLIP


def test_all_foreground_is_open_clip_encode_image(clip: ClipModel, mask_clip: MaskPromptCLIP):
    x = torch.rand(3, 3, 32, 32, generator=_gen(0)) * 2 - 1
    ours = mask_clip.encode_masked(x, torch.ones(3, 32, 32))
    ref = clip.model.encode_image(clip.preprocess(x), normalize=True)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert (
        mask_clip.encode_masked(x, torch.ones(3, 32, 32), normalize=False).norm(dim=-1).ne(1).all()
    )


def test_patch_rule_any_foreground_pixel():
    m = torch.zeros(2, 32, 32)
    m[0, 9, 17] = 1  # one pixel in patch (1, 2)
    m[1, :8, :8] = 1  # patch (0, 0) whole
    m[1, 31, 31] = 1  # and one pixel of patch (3, 3)
    fg = patch_foreground(m, 8)  # (2, 16, 1)
    assert fg.shape == (2, 16, 1)
    assert torch.nonzero(fg[0, :, 0]).flatten().tolist() == [1 * 4 + 2]
    assert torch.nonzero(fg[1, :, 0]).flatten().tolist() == [0, 15]


def test_mask_prompt_replaces_background_at_each_depth(mask_clip: MaskPromptCLIP):
    """Background tokens == mask_embedding[d] at the input (before pos/ln_pre) and after each
    block d < depth; foreground and class tokens are never replaced."""
    visual = mask_clip.clip.model.visual
    emb = mask_clip.mask_embedding.detach()  # (3, 16, 64)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        visual.ln_pre.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
        visual.transformer.resblocks[1].register_forward_pre_hook(
            lambda m, a: seen.__setitem__("d1", a[0])
        ),
        visual.ln_post.register_forward_pre_hook(lambda m, a: seen.__setitem__("d2", a[0])),
    ]
    masks = torch.zeros(1, 32, 32)
    masks[0, 9, 17] = 1  # only patch 6 is foreground
    crops = torch.rand(1, 3, 32, 32, generator=_gen(2)) * 2 - 1
    try:
        with torch.no_grad():
            mask_clip.encode_masked(crops, masks)
    finally:
        for h in hooks:
            h.remove()
    bg = torch.ones(16, dtype=torch.bool)
    bg[6] = False
    pos = visual.positional_embedding.detach()
    tokens_in = seen["in"][0] - pos  # (17, 64): class + patch tokens before the pos. embedding
    torch.testing.assert_close(tokens_in[1:][bg], emb[0][bg])
    patch_tokens = visual.conv1(mask_clip.clip.preprocess(crops)).flatten(2)[0].T  # (16, 64)
    torch.testing.assert_close(tokens_in[1 + 6], patch_tokens[6])  # foreground kept
    torch.testing.assert_close(tokens_in[0], visual.class_embedding.detach())
    for key, d in (("d1", 1), ("d2", 2)):
        x = seen[key][0]  # (17, 64)
        torch.testing.assert_close(x[1:][bg], emb[d][bg])
        assert not torch.allclose(x[1 + 6], emb[d][6])
        assert not torch.allclose(x[0], emb[d][0])  # the class token is not replaced


def test_mask_prompt_matches_reference_forward(clip: ClipModel):
    """A hand-written OVSeg forward (depth 2) on open_clip's parts."""
    model = MaskPromptCLIP(clip=clip, depth=2)
    with torch.no_grad():
        model.mask_embedding.copy_(torch.randn(2, 16, 64, generator=_gen(3)))
    v = clip.model.visual
    crops = torch.rand(2, 3, 32, 32, generator=_gen(4)) * 2 - 1
    pix = torch.zeros(2, 32, 32)
    pix[0, 3:20, 5:30] = 1
    pix[1, 16:, :] = 1
    with torch.no_grad():
        x = v.conv1(clip.preprocess(crops)).flatten(2).transpose(1, 2)  # (2, 16, 64)
        m = F.max_pool2d(pix[:, None], 8).flatten(1)[..., None]  # any foreground pixel
        e = model.mask_embedding
        x = torch.where(m > 0, x, e[0])
        x = torch.cat([v.class_embedding.expand(2, 1, 64), x], 1) + v.positional_embedding
        x = v.transformer.resblocks[0](v.ln_pre(x))
        x = torch.cat([x[:, :1], torch.where(m > 0, x[:, 1:], e[1])], 1)
        x = v.transformer.resblocks[1](x)
        ref = F.normalize(v.ln_post(x[:, 0]) @ v.proj, dim=-1)
        torch.testing.assert_close(model.encode_masked(crops, pix), ref, atol=1e-6, rtol=1e-5)
        # depth 0 is the plain CLIP whatever the mask
        plain = MaskPromptCLIP(clip=clip, depth=0).encode_masked(crops, pix)
        torch.testing.assert_close(plain, clip.encode_image(crops), atol=1e-6, rtol=1e-5)


def test_mask_prompt_gradient_reaches_only_mask_embedding(clip: ClipModel):
    model = MaskPromptCLIP(clip=clip, depth=2)
    assert model.trainable_parameters() == [model.mask_embedding]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["mask_embedding"]
    pix = torch.zeros(2, 32, 32)
    pix[:, :10, :10] = 1
    model.encode_masked(torch.zeros(2, 3, 32, 32), pix).sum().backward()
    assert model.mask_embedding.grad is not None and model.mask_embedding.grad.abs().sum() > 0


def test_masked_crops_box_fill_and_square():
    img = torch.rand(3, 20, 30, generator=_gen(5)) * 2 - 1
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 4:8, 10:20] = True  # a 4 x 10 box
    masks[0, 5, 12] = False  # a hole: background colour inside the box
    masks[1] = True
    fill = torch.tensor([0.1, -0.2, 0.3])
    crops, cm, valid = masked_crops(img, masks, (4, 10), fill)  # box size: no resampling
    assert valid.tolist() == [True, True, False]
    ref = img[:, 4:8, 10:20].clone()
    ref[:, 1, 2] = fill
    torch.testing.assert_close(crops[0], ref)
    assert cm[0].sum() == 39 and cm[1].all() and not cm[2].any()
    torch.testing.assert_close(crops[2], fill.view(3, 1, 1).expand(3, 4, 10))
    sq, sqm, _ = masked_crops(img, masks[:1], (10, 10), fill, square=True)
    torch.testing.assert_close(sq[0, :, 3:7], ref)  # centred, padded rows are the fill colour
    torch.testing.assert_close(sq[0, :, :3], fill.view(3, 1, 1).expand(3, 3, 10))
    assert sqm[0, :3].sum() == 0 and sqm[0, 3:7].sum() == 39


def test_mask_prompt_scorer_batched_equals_looped(mask_clip: MaskPromptCLIP, clip: ClipModel):
    img = torch.rand(3, 48, 40, generator=_gen(6)) * 2 - 1
    masks = torch.zeros(5, 48, 40, dtype=torch.bool)
    masks[0, :20, :20] = True
    masks[1, 10:40, 5:35] = True
    masks[2, 30:, 30:] = True
    masks[3, 2, 3] = True
    props = _proposals(masks)  # masks[4] empty -> NaN
    for scorer in (MaskPromptScorer(model=mask_clip), MaskedCropClipScorer(clip=clip)):
        batched = scorer(img, props, "bird")
        looped = torch.cat([scorer(img, _proposals(masks[k : k + 1]), "bird") for k in range(5)])
        assert batched.shape == (5,) and torch.isnan(batched[4]) and torch.isnan(looped[4])
        torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-4, equal_nan=True)
    text = clip.encode_text(["a photo of a bird."])[0]
    crops, cm, _ = mask_clip.crops(img, masks[:1])
    expected = mask_clip.encode_masked(crops, cm)[0] @ text
    torch.testing.assert_close(MaskPromptScorer(model=mask_clip)(img, props, "bird")[0], expected)


def test_ovseg_checkpoint_loads_strictly(tmp_path: Path, mask_clip: MaskPromptCLIP):
    src = mask_clip.clip.model.state_dict()
    sd = {OVSEG_CLIP_PREFIX + k: v.clone() for k, v in src.items()}
    sd[OVSEG_CLIP_PREFIX + "visual.mask_embedding"] = mask_clip.mask_embedding.detach().clone()
    sd["clip_adapter.non_object_embedding"] = torch.zeros(1, 32)  # other OVSeg parts: ignored
    sd["backbone.stem.weight"] = torch.zeros(2)
    path = tmp_path / "ovseg_tiny_ft_mpt.pth"
    torch.save({"model": sd, "iteration": 5}, path)

    torch.manual_seed(123)
    fresh = MaskPromptCLIP(clip=ClipModel(TINY_CLIP_NAME), depth=3)
    fresh.load_ovseg(path)
    torch.testing.assert_close(fresh.mask_embedding, mask_clip.mask_embedding)
    for k, v in fresh.clip.model.state_dict().items():
        torch.testing.assert_close(v, src[k])

    bad = dict(sd)
    del bad[OVSEG_CLIP_PREFIX + "visual.proj"]
    bad[OVSEG_CLIP_PREFIX + "visual.extra_head"] = torch.zeros(3)
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"visual\.proj.*visual\.extra_head"):
        fresh.load_ovseg(tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"pass depth=3"):
        MaskPromptCLIP(clip=fresh.clip, depth=2).load_ovseg(path)
    no_prompt = {k: v for k, v in sd.items() if not k.endswith("mask_embedding")}
    torch.save({"model": no_prompt}, tmp_path / "no_prompt.pth")
    with pytest.raises(CheckpointMismatchError, match="mask_embedding"):
        fresh.load_ovseg(tmp_path / "no_prompt.pth")
    torch.save({"state_dict": sd}, tmp_path / "lightning.pth")
    with pytest.raises(KeyError, match="not an OVSeg"):
        fresh.load_ovseg(tmp_path / "lightning.pth")


def test_open_clip_weights_and_ovseg_names(tmp_path: Path, clip: ClipModel):
    path = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), path)
    model = MaskPromptCLIP(TINY_CLIP_NAME, pretrained=str(path), depth=1)
    torch.testing.assert_close(model.clip.model.visual.proj, clip.model.visual.proj)
    assert model.mask_embedding.abs().sum() == 0  # OVSeg's init: zeros
    assert quickgelu_name("ViT-L-14") == "ViT-L-14-quickgelu"
    assert quickgelu_name("ViT-B-16-quickgelu") == "ViT-B-16-quickgelu"
    with pytest.raises(ValueError, match="QuickGELU"):
        quickgelu_name(TINY_CLIP_NAME)


# ---------------------------------------------------------------- token-wise scorer


def test_token_grid_is_bilinear_not_maxpool():
    """Bilinear (align_corners=False) + "> 0" keeps a cell only where the sample points see the
    entity; max-pooling dilates into a neighbour that the entity touches with one pixel row."""
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, :5, :8] = True  # rows 0..4: row 4 is the first pixel row of grid row 1
    ours = TokenWiseScorer.token_masks(_GridOnly((4, 4)), mask)[0]
    ref = F.interpolate(mask[:, None].float(), size=(4, 4), mode="bilinear") > 0
    maxpool = F.max_pool2d(mask[:, None].float(), 4)[0, 0] > 0
    assert torch.equal(ours, ref[0, 0])
    assert ours[0, :2].all() and not ours[1].any()  # grid row 1 not taken ...
    assert maxpool[1, :2].all()  # ... where max-pooling dilates into it
    assert torch.equal(ours, mask_to_token_mask(mask[0], (4, 4), min_tokens=0))


class _GridOnly:
    """Just enough of a TokenWiseScorer for `token_masks`."""

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = grid


def test_entity_token_scores_formula_and_small_entities():
    patches = F.normalize(torch.randn(6, 4, generator=_gen(7)), dim=-1)
    words = F.normalize(torch.randn(2, 4, generator=_gen(8)), dim=-1)
    cells = torch.zeros(3, 6, dtype=torch.bool)
    cells[0, :4] = True
    cells[1, 1:6] = True
    cells[2, 5] = True  # one cell < 4: not scored
    got = entity_token_scores(patches, words, cells, min_cells=4)
    per_patch = torch.tensor([max(float(p @ w) for w in words) for p in patches])
    torch.testing.assert_close(got[:2], torch.stack([per_patch[:4].mean(), per_patch[1:].mean()]))
    assert torch.isnan(got[2])
    # several words at once (padded, with a token mask) = one word at a time
    other = F.normalize(torch.randn(1, 4, generator=_gen(9)), dim=-1)
    padded = torch.stack([words, torch.cat([other, torch.zeros(1, 4)])])  # (2, 2, 4)
    valid = torch.tensor([[True, True], [True, False]])
    both = entity_token_scores(patches, padded, cells, min_cells=4, word_mask=valid)  # (3, 2)
    torch.testing.assert_close(both[:, 0], got, equal_nan=True)
    torch.testing.assert_close(
        both[:, 1], entity_token_scores(patches, other, cells, min_cells=4), equal_nan=True
    )


def test_word_positions(clip: ClipModel):
    scorer = TokenWiseScorer(clip=clip)
    tokens, pos = scorer.word_positions("fire hydrant")
    ids = tokens[0].tolist()
    eot = ids.index(49407)
    assert pos == list(range(5, eot - 1))  # 5 .. EOT-2: the authors' rule
    assert ids[5 : eot - 1] == clip.tokenizer.encode("fire hydrant") and len(pos) > 1
    assert scorer.word_positions("bird")[1] == [5]
    other = TokenWiseScorer(clip=clip, template="{word} in the picture")
    assert other.word_positions("red car")[1] == [1, 2]
    with pytest.raises(ValueError, match="cannot locate"):
        TokenWiseScorer(clip=clip, template="a photo of a{word}.").word_positions("bird")
    # several words in one forward: each word's own features, padded and masked
    feats, valid = word_token_features(
        clip.model, clip.tokenizer, scorer.template, ["fire hydrant", "bird"], torch.device("cpu")
    )
    n = len(pos)
    assert valid.tolist() == [[True] * n, [True] + [False] * (n - 1)]
    torch.testing.assert_close(feats[0], scorer.word_features("fire hydrant"))
    torch.testing.assert_close(feats[1, :1], scorer.word_features("bird"))


def test_token_scorer_batched_equals_looped_and_skips_small(clip: ClipModel):
    scorer = TokenWiseScorer(clip=clip)
    img = torch.rand(3, 64, 64, generator=_gen(9)) * 2 - 1
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[0, :32, :32] = True
    masks[1, 16:, 8:40] = True
    masks[2, 40:, 40:] = True
    masks[3, 0:20, 60:] = True  # 1 column of the 4 x 4 grid at most: fewer than 4 cells
    props = _proposals(masks)
    batched = scorer(img, props, "bird")
    looped = torch.cat([scorer(img, _proposals(masks[k : k + 1]), "bird") for k in range(4)])
    torch.testing.assert_close(batched, looped, equal_nan=True)
    assert not torch.isnan(batched[:3]).any() and torch.isnan(batched[3])
    # the same from the parts: one image forward, word tokens, cells
    cells = scorer.token_masks(masks).flatten(1)
    ref = entity_token_scores(scorer.image_features(img), scorer.word_features("bird"), cells)
    torch.testing.assert_close(batched, ref, equal_nan=True)


# ---------------------------------------------------------------- aligner


class _StubScorer:
    """Planted similarities per word; records how often it was called."""

    selection, threshold = "threshold", 0.5

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table, self.calls = table, 0

    def __call__(self, image, proposals, word):
        self.calls += 1
        return torch.tensor(self.table[word][: len(proposals)])


class _FakeSegmenter:
    def __init__(self, proposals: EntityProposals) -> None:
        self.proposals = proposals

    def segment(self, image, sample=None):
        return self.proposals


def _four_masks() -> torch.Tensor:
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[0, :16, :16] = True
    masks[1, :16, 16:] = True
    masks[2, 16:, :16] = True
    masks[3, 30:, 30:] = True  # 2 x 2 pixels: under 4 cells of an 8 x 8 grid
    return masks


def test_aligner_selection_rules():
    img = torch.zeros(3, 32, 32)
    masks = _four_masks()
    seg = _FakeSegmenter(_proposals(masks))
    stub = _StubScorer({"bird": [0.6, 0.9, 0.2, 0.95], "cat": [0.1, 0.3, 0.2, float("nan")]})
    r = EntityAligner(stub, seg).align(img, "bird")
    assert r.chosen == [3, 1, 0]  # best first, then every one >= 0.5
    assert torch.equal(r.mask, masks[[3, 1, 0]].any(0)) and r.token_mask is None
    assert EntityAligner(stub, seg, selection="argmax").align(img, "bird").chosen == [3]
    # with the editor grid, the 2 x 2-pixel proposal covers 1 cell of 8 x 8: not eligible
    r = EntityAligner(stub, seg).align(img, "bird", token_grid=(8, 8))
    assert r.chosen == [1, 0]
    assert torch.equal(r.token_mask, mask_to_token_mask(masks[[1, 0]].any(0), (8, 8)))
    assert r.token_mask.sum() == 32
    # the best is always taken, even below the threshold; strict mode refuses it
    assert EntityAligner(stub, seg).align(img, "cat").chosen == [1]
    with pytest.raises(EntityNotFoundError, match=r"threshold 0.5.*#1: 0.300"):
        EntityAligner(stub, seg, threshold_mode="strict").align(img, "cat")
    r = EntityAligner(stub, seg, threshold=0.15).align(img, "cat")
    assert r.chosen == [1, 2] and torch.isnan(r.similarities[3])
    # only the segmenter's best 2 are scored
    r = EntityAligner(stub, seg, max_proposals=2).align(img, "bird")
    assert r.chosen == [1, 0] and torch.isnan(r.similarities[2:]).all()


def test_aligner_picks_the_instance():
    """pick: "all" every eligible proposal at or above the threshold, k the k-th best whatever
    its score, "best" the rule; a rank past the eligible ones or "all" below the threshold is
    not found, with the ranking."""
    img = torch.zeros(3, 32, 32)
    seg = _FakeSegmenter(_proposals(_four_masks()))
    stub = _StubScorer({"bird": [0.6, 0.9, 0.2, 0.95], "cat": [0.1, 0.3, 0.2, float("nan")]})
    argmax = {"selection": "argmax"}
    assert EntityAligner(stub, seg, pick="all", **argmax).align(img, "bird").chosen == [3, 1, 0]
    assert EntityAligner(stub, seg, pick=2, **argmax).align(img, "bird").chosen == [1]
    assert EntityAligner(stub, seg, pick="3").align(img, "bird").chosen == [0]
    assert EntityAligner(stub, seg, pick=2).align(img, "cat").chosen == [2]  # below 0.5: chosen
    # the 2 x 2-pixel proposal is not eligible on an 8 x 8 grid: the best is then #1
    assert EntityAligner(stub, seg, pick=1).align(img, "bird", token_grid=(8, 8)).chosen == [1]
    with pytest.raises(EntityNotFoundError, match=r"pick=4 .* only 3 are eligible"):
        EntityAligner(stub, seg, pick=4).align(img, "bird", token_grid=(8, 8))
    with pytest.raises(EntityNotFoundError, match=r"threshold 0.5 \(pick='all'\)"):
        EntityAligner(stub, seg, pick="all").align(img, "cat")
    # a word asked for again later takes its best only; the last request the rest at >= 0.5
    found = EntityAligner(stub, seg, pick="all").align_many(img, "bird: a | bird: b")
    assert [e.result.chosen for e in found] == [[3], [1, 0]]
    # "#i": proposal i itself (the app's click), whatever its rank or score
    assert EntityAligner(stub, seg, pick="#2").align(img, "bird").chosen == [2]
    assert EntityAligner(stub, seg, pick=" #0").align(img, "cat").chosen == [0]
    with pytest.raises(EntityNotFoundError, match=r"pick='#3' names proposal 3, and it is too"):
        EntityAligner(stub, seg, pick="#3").align(img, "bird", token_grid=(8, 8))
    with pytest.raises(EntityNotFoundError, match=r"pick='#7' .* only 4"):
        EntityAligner(stub, seg, pick="#7").align(img, "bird")
    for bad in (0, -1, "some", 1.5, True, "#", "#x", "#-1"):
        with pytest.raises(ValueError, match="pick must be"):
            EntityAligner(stub, seg, pick=bad)


def test_aligner_raises_when_nothing_matches():
    img = torch.zeros(3, 32, 32)
    empty = EntityProposals(torch.zeros(0, 32, 32, dtype=torch.bool), torch.zeros(0))
    stub = _StubScorer({"bird": [float("nan")] * 4, "tiny": [0.1, 0.1, 0.1, 0.9]})
    with pytest.raises(EntityNotFoundError, match="proposed no entities"):
        EntityAligner(stub).align(img, "bird", proposals=empty)
    with pytest.raises(EntityNotFoundError, match="could be scored") as err:
        EntityAligner(stub).align(img, "bird", proposals=_proposals(_four_masks()))
    assert err.value.word == "bird" and len(err.value.ranking) == 4
    only_small = _proposals(_four_masks()[3:])
    with pytest.raises(EntityNotFoundError, match=r"fewer than 4 cells.*#0: 0.100"):
        EntityAligner(stub).align(img, "tiny", token_grid=(8, 8), proposals=only_small)
    with pytest.raises(ValueError, match="no segmenter"):
        EntityAligner(stub).align(img, "bird")
    with pytest.raises(ValueError, match="needs a threshold"):
        EntityAligner(MaskPromptScorer.__new__(MaskPromptScorer), selection="threshold")


def test_multi_entity_parsing_and_alignment():
    assert parse_entity_edits("bird: a blue bird | branch: a snowy branch") == [
        ("bird", "a blue bird"),
        ("branch", "a snowy branch"),
    ]
    assert parse_entity_edits(" sky :a sky: at dusk ") == [("sky", "a sky: at dusk")]
    for bad in ("a blue bird", "bird: a blue bird | ", ": nothing"):
        with pytest.raises(ValueError, match="word: description"):
            parse_entity_edits(bad)
    img = torch.zeros(3, 32, 32)
    stub = _StubScorer({"bird": [0.9, 0.8, 0.1, 0.7], "branch": [0.1, 0.2, 0.9, 0.3]})
    aligner = EntityAligner(stub, _FakeSegmenter(_proposals(_four_masks())))
    edits = aligner.align_many(
        img, "bird: a red bird | branch: a snowy branch | bird: a blue bird"
    )
    assert [(e.word, e.text) for e in edits] == [
        ("bird", "a red bird"),
        ("branch", "a snowy branch"),
        ("bird", "a blue bird"),
    ]
    # "bird" is asked again later: the first takes only its best, the second the next best
    assert [e.result.chosen for e in edits] == [[0], [2], [1, 3]]
    assert stub.calls == 2  # scored once per distinct word
    once = aligner.align_many(img, [("bird", "a red bird")])
    assert once[0].result.chosen == [0, 1, 3]
    with pytest.raises(EntityNotFoundError, match="taken by an earlier request"):
        EntityAligner(stub, selection="argmax").align_many(
            img, "bird: a | bird: b", proposals=_proposals(_four_masks()[:1])
        )


def test_aligner_finds_planted_entity_with_token_scorer(clip: ClipModel):
    """Features built so that the answer is known: the patches under entity 1 carry the word's
    direction, every other patch is orthogonal to it."""
    scorer = TokenWiseScorer(clip=clip, threshold=0.5)
    D, word_dir = clip.embed_dim, torch.zeros(clip.embed_dim)
    word_dir[0] = 1.0
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :32, :32] = True  # grid cells (0..1, 0..1)
    masks[1, 32:, 32:] = True  # grid cells (2..3, 2..3): the planted one
    masks[2, :32, 32:] = True
    patches = torch.zeros(4, 4, D)
    patches[..., 1] = 1.0  # orthogonal to the word
    patches[2:, 2:] = word_dir
    scorer.image_features = lambda image: patches.reshape(16, D)
    scorer.word_features = lambda word: torch.stack([word_dir, -word_dir])  # max over tokens
    result = EntityAligner(scorer).align(
        torch.zeros(3, 64, 64), "bird", token_grid=(16, 16), proposals=_proposals(masks)
    )
    assert result.chosen == [1]
    torch.testing.assert_close(result.similarities, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(result.mask, masks[1]) and result.token_mask[8:, 8:].all()
    assert result.token_mask.sum() == 64


def test_alignment_configs_instantiate():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    tiny = [f"alignment.scorer.model_name={TINY_CLIP_NAME}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfgs = {
            "token_wise": compose(
                "alignment/default", tiny + ["alignment.scorer.pretrained=null"]
            ),
            "mask_prompt": compose(
                "alignment/default",
                tiny
                + [
                    "alignment/scorer=mask_prompt",
                    "alignment.scorer.ovseg_ckpt=null",
                    "alignment.scorer.depth=2",
                ],
            ),
            "masked_crop_clip": compose(
                "alignment/default",
                tiny + ["alignment/scorer=masked_crop_clip", "alignment.scorer.pretrained=null"],
            ),
        }
    GlobalHydra.instance().clear()
    expected = {
        "token_wise": (TokenWiseScorer, "threshold", 0.163),
        # the crop scorers: Eq. 1's argmax; 0.2 is what manipulate.py's strict default refuses
        # under (assumed)
        "mask_prompt": (MaskPromptScorer, "argmax", 0.2),
        "masked_crop_clip": (MaskedCropClipScorer, "argmax", 0.2),
    }
    for name, cfg in cfgs.items():
        aligner = instantiate(cfg.alignment, segmenter=None)
        cls, selection, threshold = expected[name]
        assert isinstance(aligner.scorer, cls)
        assert (aligner.selection, aligner.threshold) == (selection, threshold)


def test_masked_crops_of_the_whole_image() -> None:
    """region="image" (the paper's masked image): the input's whole extent, every non-entity
    pixel the fill colour; "box": OVSeg's crop of the entity's bounding box."""
    from semani.utils.masks import masked_crops

    image = torch.linspace(-1, 1, 3 * 8 * 12).reshape(3, 8, 12)
    masks = torch.zeros(2, 8, 12, dtype=torch.bool)
    masks[0, 2:4, 3:9] = True
    fill = torch.tensor([0.1, 0.2, 0.3])
    crops, crop_masks, valid = masked_crops(image, masks, (8, 12), fill, full=True)
    assert valid.tolist() == [True, False]
    assert torch.equal(crop_masks[0], masks[0].float())  # the same extent: nothing cropped
    inside = masks[0].expand(3, -1, -1)
    torch.testing.assert_close(crops[0][inside], image[inside], atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[0][:, 0, 0], fill)
    box, box_masks, _ = masked_crops(image, masks, (8, 12), fill)
    assert box_masks[0].all()  # the box is all entity
