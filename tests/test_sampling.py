"""Static-KV-cache sampler: top-k filter, cache == no cache, forced tokens, reproducibility."""

import pytest
import torch

from semani.manipulation.sampling import (
    sample_image_tokens,
    sample_logits,
    top_k_filter,
    top_k_k,
)
from semani.modules.gpt import GPTConfig, SemaniGPT

B = 3


@pytest.fixture(scope="module")
def model() -> SemaniGPT:
    torch.manual_seed(0)
    return SemaniGPT(GPTConfig.tiny(text_vocab_size=512, text_eot_token=511)).eval()


@pytest.fixture(scope="module")
def batch(model):
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, 500, (B, cfg.text_len), generator=g)
    text[:, -1] = 511
    image = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    gray = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    mask = torch.rand(B, cfg.image_len, generator=g) < 0.5
    mask[:, :3] = False  # a forced prefix goes through prefill
    mask[0, 3] = True
    return text, image, gray, mask


@pytest.mark.parametrize(("V", "thres", "k"), [(1024, 0.99, 10), (64, 0.99, 1), (64, 0.5, 32)])
def test_top_k_keeps_exactly_k(V, thres, k):
    assert top_k_k(V, thres) == k
    logits = torch.randn(4, V)
    out = top_k_filter(logits, thres)
    assert (torch.isfinite(out).sum(-1) == k).all()
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], logits[kept])
    lowest_kept = logits[kept].view(4, k).min(-1).values
    assert (lowest_kept >= logits[~kept].view(4, V - k).max(-1).values).all()
    ties = top_k_filter(torch.zeros(2, V), thres)  # ties still keep exactly k
    assert (torch.isfinite(ties).sum(-1) == k).all()
    with pytest.raises(ValueError, match="filter_thres"):
        top_k_k(V, 1.5)


def test_sample_logits_greedy_temperature_and_generator():
    logits = torch.randn(5, 64)
    assert torch.equal(sample_logits(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    a = sample_logits(logits, 0.5, generator=torch.Generator().manual_seed(1))
    b = sample_logits(logits, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top = logits.topk(32, -1).indices
    assert (top == a[:, None]).any(-1).all()  # draws stay inside the top k
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=-1.0)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("guidance", ["none", "mixed"])
def test_cached_and_uncached_sampling_identical(model, batch, greedy, guidance):
    text, image, gray, mask = batch
    g, use = (None, None) if guidance == "none" else (gray, torch.tensor([True, False, True]))
    runs = [
        sample_image_tokens(
            model,
            text,
            image,
            mask,
            g,
            use,
            filter_thres=0.9,
            greedy=greedy,
            generator=torch.Generator().manual_seed(7),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
    out = runs[0]
    assert torch.equal(out[~mask], image[~mask])  # forced positions are the original tokens
    assert (out[mask] != image[mask]).any()  # and the masked ones were really re-sampled


def test_full_sampling_without_image_cache_equals_no_cache(model, batch):
    text, _, gray, _ = batch
    kw = dict(gray=gray, generator=None, filter_thres=0.8)
    torch.manual_seed(11)
    a = sample_image_tokens(model, text, use_cache=True, **kw)
    torch.manual_seed(11)
    b = sample_image_tokens(model, text, use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (B, model.config.image_len)


def test_seeds_and_skipped_gray_segment(model, batch):
    text, image, gray, mask = batch

    def run(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return sample_image_tokens(model, text, image, mask, generator=gen, filter_thres=0.5, **kw)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    # gray included but switched off everywhere samples the same tokens as gray skipped
    assert torch.equal(run(1), run(1, gray=gray, use_gray=torch.zeros(B, dtype=torch.bool)))


def test_nothing_to_sample_and_errors(model, batch):
    text, image, _, mask = batch
    none = torch.zeros_like(mask)
    assert torch.equal(sample_image_tokens(model, text, image, none), image)
    with pytest.raises(ValueError, match="pass image"):
        sample_image_tokens(model, text, None, mask)
    with pytest.raises(ValueError, match="token_mask"):
        sample_image_tokens(model, text, image, mask[:, :4])


def test_training_mode_restored(model, batch):
    text, image, _, mask = batch
    model.train()
    try:
        sample_image_tokens(model, text, image, mask, greedy=True)
        assert model.training
    finally:
        model.eval()
