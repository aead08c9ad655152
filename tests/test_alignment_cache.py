"""`EntityAligner(cache=n)`: a second edit of an image reuses its proposals and the scorer's
image features, with the same similarities and masks as without the cache (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from semani.alignment import EntityAligner, EntityProposals, MaskPromptScorer, TokenWiseScorer
from semani.alignment.cache import AlignmentCache, fingerprint
from semani.modules.clip import TINY_CLIP_NAME, ClipModel
from semani.modules.mask_clip import MaskPromptCLIP


class _CountingSegmenter:
    """Fixed proposals; counts its calls (and the words it was given, when text-conditioned)."""

    def __init__(self, masks: torch.Tensor, text_conditioned: bool = False) -> None:
        self.masks, self.calls, self.words = masks, 0, []
        self.text_conditioned = text_conditioned

    def segment(self, image, sample=None, word=None):
        self.calls += 1
        self.words.append(word)
        masks = self.masks if word != "square" else self.masks[:2]
        return EntityProposals(masks, torch.linspace(1.0, 0.5, masks.shape[0]))


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :32, :32] = True
    masks[1, 16:, 8:40] = True
    masks[2, 40:, 40:] = True
    return masks


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    torch.manual_seed(0)
    return ClipModel(TINY_CLIP_NAME)


def _scorers(clip: ClipModel):
    torch.manual_seed(1)
    return {
        "token_wise": TokenWiseScorer(clip=clip, threshold=0.0),
        "mask_prompt": MaskPromptScorer(model=MaskPromptCLIP(clip=clip, depth=2)),
    }


def _count(scorer) -> list[int]:
    calls = [0]
    encode = scorer.encode

    def counted(*args, **kwargs):
        calls[0] += 1
        return encode(*args, **kwargs)

    scorer.encode = counted
    return calls


@pytest.mark.parametrize("kind", ["token_wise", "mask_prompt"])
def test_a_second_word_reuses_the_proposals_and_the_image_features(clip, kind) -> None:
    scorer = _scorers(clip)[kind]
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = EntityAligner(scorer, _CountingSegmenter(_masks()))
    segmenter = _CountingSegmenter(_masks())
    cached = EntityAligner(scorer, segmenter, cache=2)
    encodes = _count(scorer)
    for word in ("circle", "square", "circle", "red star"):
        want = plain.align(image, word, token_grid=(8, 8))
        got = cached.align(image.clone(), word, token_grid=(8, 8))  # a copy: the same bytes
        assert torch.equal(got.similarities.nan_to_num(-9), want.similarities.nan_to_num(-9))
        assert got.chosen == want.chosen and torch.equal(got.mask, want.mask)
        assert torch.equal(got.token_mask, want.token_mask)
    assert segmenter.calls == 1  # one image: segmented once
    assert encodes[0] == 4 + 1  # plain: one image-tower pass per align; cached: the first
    assert (cached.cache.misses, cached.cache.hits) == (2, 6)  # proposals + features, then hits
    # several entities of the same image: nothing is recomputed either
    many = cached.align_many(image, "circle: a red circle | square: a blue square")
    assert (segmenter.calls, encodes[0], cached.cache.hits) == (1, 5, 6 + 3)
    assert [e.result.chosen for e in many] == [
        e.result.chosen for e in plain.align_many(image, "circle: a | square: b")
    ]


def test_another_image_misses_and_the_oldest_image_leaves(clip) -> None:
    scorer = _scorers(clip)["mask_prompt"]
    encodes = _count(scorer)
    segmenter = _CountingSegmenter(_masks())
    aligner = EntityAligner(scorer, segmenter, cache=1)
    a = torch.zeros(3, 64, 64)
    b = a.clone()
    b[0, 5, 7] = 0.5  # one value differs: another image
    aligner.align(a, "circle")
    aligner.align(b, "circle")
    assert (segmenter.calls, encodes[0], len(aligner.cache)) == (2, 2, 1)
    aligner.align(a, "circle")  # evicted by b (size 1): made again
    assert (segmenter.calls, encodes[0]) == (3, 3)
    aligner.align(a, "square")
    assert (segmenter.calls, encodes[0]) == (3, 3)


def test_what_is_not_cached(clip) -> None:
    scorer = _scorers(clip)["mask_prompt"]
    image = torch.zeros(3, 64, 64)
    # proposals made from a data set sample (the ground-truth segmenter) depend on the sample
    segmenter = _CountingSegmenter(_masks())
    aligner = EntityAligner(scorer, segmenter, cache=4)
    aligner.align(image, "circle", sample={"index": 0})
    aligner.align(image, "circle", sample={"index": 1})
    assert segmenter.calls == 2
    # a text-conditioned segmenter: per word
    segmenter = _CountingSegmenter(_masks(), text_conditioned=True)
    aligner = EntityAligner(scorer, segmenter, cache=4)
    for word in ("circle", "square", "circle", "square"):
        aligner.align(image, word)
    assert segmenter.words == ["circle", "square"]
    # no cache: every call segments
    segmenter = _CountingSegmenter(_masks())
    aligner = EntityAligner(scorer, segmenter)
    aligner.align(image, "circle")
    aligner.align(image, "circle")
    assert segmenter.calls == 2 and aligner.cache is None


def test_fingerprint_and_cache_arguments() -> None:
    x = torch.arange(12.0).reshape(3, 2, 2)
    assert fingerprint(x) == fingerprint(x.clone()) == fingerprint(x.transpose(1, 2).mT)
    assert fingerprint(x) != fingerprint(x.reshape(3, 4))  # the shape counts
    assert fingerprint(x) != fingerprint(x.double())  # and the dtype
    y = x.clone()
    y[2, 1, 1] += 1e-6
    assert fingerprint(x) != fingerprint(y)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="cache size"):
            AlignmentCache(bad)
