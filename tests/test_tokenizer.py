"""CLIP BPE tokenizer: equal to open_clip.tokenize, padding and truncation scheme."""

import open_clip
import pytest
import torch

from semani.data.tokenizer import TextTokenizer, text_padding_mask

CAPTIONS = [
    "a photo of a cat",
    "this bird has a red crown, a short pointed bill and white wing-bars.",
    "A PINK flower with   many\tpetals\nand a yellow centre!!",
    "the flower's petals are purple; its stamen is long (and yellow)",
    "naïve café déjà vu — 東京 🌸 emoji & ünïcödé",
    "",
    "a red circle above a small blue square on a grey background",
    " ".join(["a long caption that keeps going"] * 40),  # > 128 BPE tokens: truncated
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(context_length=128)


def test_attributes(tok: TextTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49406, 49407, 0)
    assert tok.context_length == 128


def test_known_ids(tok: TextTokenizer) -> None:
    # CLIP's published ids for "a photo of a cat": SOT a photo of a cat EOT, then padding
    expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * (128 - 7)
    assert tok("a photo of a cat")[0].tolist() == expected


@pytest.mark.parametrize("context_length", [128, 77, 16])
def test_matches_open_clip(context_length: int) -> None:
    tok = TextTokenizer(context_length)
    ours = tok(CAPTIONS)
    ref = open_clip.tokenize(CAPTIONS, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(CAPTIONS), context_length)
    assert torch.equal(ours, ref)


def test_padding_and_truncation_scheme(tok: TextTokenizer) -> None:
    tokens = tok(CAPTIONS)  # (B, 128)
    pad = text_padding_mask(tokens)
    for text, row, pad_row in zip(CAPTIONS, tokens, pad):
        bpe = tok.encode(text)
        assert row[0] == tok.sot_token_id
        assert int((row == tok.eot_token_id).sum()) == 1  # exactly one EOT, truncated or not
        eot = int((row == tok.eot_token_id).nonzero())
        if len(bpe) + 2 <= tok.context_length:
            assert row[1:eot].tolist() == bpe and eot == len(bpe) + 1
            assert (row[eot + 1 :] == 0).all()
        else:  # truncated: first L-1 tokens kept, EOT last
            assert eot == tok.context_length - 1
            assert row[1:eot].tolist() == bpe[: tok.context_length - 2]
        assert pad_row.tolist() == [i > eot for i in range(tok.context_length)]


def test_padding_mask_without_eot() -> None:
    tokens = torch.tensor([[49406, 5, 6, 0], [49406, 49407, 0, 0]])
    assert text_padding_mask(tokens).tolist() == [[False] * 4, [False, False, True, True]]
    # only what follows the FIRST EOT is padding; a 0 ("!") before it is a real token
    tokens = torch.tensor([[49406, 0, 49407, 49407, 0]])
    assert text_padding_mask(tokens, 49407).tolist() == [[False, False, False, True, True]]


def test_padding_mask_has_one_implementation() -> None:
    """Data and transformer share `semani.utils.text_tokens`'s function (no data -> modules)."""
    from semani.modules import gpt
    from semani.utils import text_tokens

    assert text_padding_mask is gpt.text_padding_mask is text_tokens.text_padding_mask


def test_decode_roundtrip(tok: TextTokenizer) -> None:
    texts = [
        "a red circle above a small blue square",
        "this flower has yellow petals",
    ]  # decode spaces punctuation
    assert tok.decode(tok(texts)) == texts
    assert tok.decode(tok(texts[0])[0]) == texts[0]


def test_bad_context_length() -> None:
    with pytest.raises(ValueError, match="context_length"):
        TextTokenizer(context_length=1)
