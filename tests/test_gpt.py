"""SemaniGPT: size, logit alignment, vision-guidance mask, switches, optimizer groups, KV cache."""

import pytest
import torch
import torch.nn as nn

from semani.modules.gpt import GPTConfig, KVCache, SemaniGPT
from semani.utils.text_tokens import text_padding_mask

EOT = 49407


def _model(seed: int = 0, **overrides) -> SemaniGPT:
    torch.manual_seed(seed)
    return SemaniGPT(GPTConfig.tiny(**overrides)).eval()


def _batch(cfg: GPTConfig, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 49000, (B, cfg.text_len), generator=g)
    text[:, 0] = 49406
    text[0, 6], text[0, 7:] = EOT, 0  # sample 0 is padded after position 6
    text[1:, -1] = EOT
    image = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    gray = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    return text, image, gray


def test_paper_size_parameter_count():
    with torch.device("meta"):
        model = SemaniGPT(GPTConfig())
    n = model.get_num_params()
    assert abs(n - 152e6) / 152e6 < 0.03, n
    assert n == 152_866_048  # the arithmetic documented in GPTConfig
    text_head = sum(p.numel() for p in model.text_head.parameters())
    assert 24e6 < text_head < 26e6
    assert model.get_num_params(non_embedding=True) == n - (128 + 256) * 512


def test_output_shapes_and_gray_none():
    model = _model()
    cfg = model.config
    text, image, gray = _batch(cfg)
    out = model(text, image)
    assert out.text_logits.shape == (3, cfg.text_len, cfg.text_vocab_size)
    assert out.image_logits.shape == (3, cfg.image_len, cfg.image_vocab_size)
    assert out.gray_logits is None
    out = model(text, image, gray, torch.tensor([True, False, True]))
    assert out.gray_logits.shape == (3, cfg.image_len, cfg.image_vocab_size)


def test_logits_are_aligned_and_causal():
    """logits[:, i] predicts token i: changing token i changes only logits after i."""
    model = _model()
    text, image, gray = _batch(model.config)
    base = model(text, image, gray)
    i = 5
    image2 = image.clone()
    image2[:, i] = (image2[:, i] + 1) % model.config.image_vocab_size
    out = model(text, image2, gray)
    diff = (out.image_logits - base.image_logits).abs().amax(dim=(0, 2))  # (Li,)
    assert torch.all(diff[: i + 1] == 0) and torch.all(diff[i + 1 :] > 0)
    assert torch.equal(out.text_logits, base.text_logits)

    text2 = text.clone()
    text2[1:, 3] += 1  # unpadded rows
    out = model(text2, image, gray)
    diff = (out.text_logits - base.text_logits)[1:].abs().amax(dim=(0, 2))  # (Lt,)
    assert torch.all(diff[:4] == 0) and torch.all(diff[4:] > 0)
    assert torch.all((out.image_logits - base.image_logits)[1:].abs().amax(dim=(1, 2)) > 0)


def test_text_padding_uses_learned_pad_embedding():
    model = _model()
    text, image, _ = _batch(model.config)
    base = model(text, image).image_logits
    text2 = text.clone()
    text2[0, 7:] = 123  # tokens after EOT are replaced by the pad embedding: no effect
    assert torch.equal(model(text2, image).image_logits, base)
    with torch.no_grad():
        model.text_pad_emb.weight[10] += torch.randn(64)  # only sample 0 is padded at 10
    out = model(text, image).image_logits
    assert not torch.allclose(out[0], base[0], atol=1e-3)
    torch.testing.assert_close(out[1:], base[1:], atol=1e-6, rtol=0)
    assert text_padding_mask(text, EOT)[0].nonzero().flatten().tolist() == list(
        range(7, model.config.text_len)
    )
    assert not text_padding_mask(text, EOT)[1:].any()  # EOT last: no padding


def test_text_pad_targets_adds_one_text_class_per_position():
    """The authors' text loss needs pad classes: text head text_vocab_size + text_len outputs."""
    plain, padded = _model(), _model(text_pad_targets=True)
    cfg = padded.config
    assert plain.text_head.out_features == plain.text_classes == cfg.text_vocab_size
    assert (
        padded.text_head.out_features == padded.text_classes == cfg.text_vocab_size + cfg.text_len
    )
    text, image, gray = _batch(cfg)
    out = padded(text, image, gray)
    assert out.text_logits.shape == (3, cfg.text_len, cfg.text_vocab_size + cfg.text_len)
    assert out.image_logits.shape == (3, cfg.image_len, cfg.image_vocab_size)
    # the image path (and so the KV-cache sampler) does not depend on the text head
    cache = padded.new_kv_cache(3, with_gray=False)
    torch.testing.assert_close(
        padded.prefill(text, cache), padded(text, image).image_logits[:, 0], atol=1e-5, rtol=0
    )
    from semani.manipulation.sampling import sample_image_tokens

    cached = sample_image_tokens(padded, text, greedy=True)
    assert torch.equal(cached, sample_image_tokens(padded, text, greedy=True, use_cache=False))
    # at the paper size: 128 * (512 + 1) more parameters, as documented in GPTConfig
    with torch.device("meta"):
        big = SemaniGPT(GPTConfig(text_pad_targets=True))
    assert big.get_num_params() == 152_866_048 + 128 * 513 == 152_931_712


def test_vision_guidance_attention_mask():
    """Perturbing gray tokens: text logits never change; image logits only where use_gray;
    gray logits causally."""
    model = _model()
    text, image, gray = _batch(model.config)
    use = torch.tensor([True, False, True])
    base = model(text, image, gray, use)
    j = 4
    gray2 = gray.clone()
    gray2[:, j] = (gray2[:, j] + 7) % model.config.image_vocab_size
    out = model(text, image, gray2, use)
    assert torch.equal(out.text_logits, base.text_logits)
    img_diff = (out.image_logits - base.image_logits).abs().amax(dim=(1, 2))  # (B,)
    assert img_diff[0] > 0 and img_diff[2] > 0 and img_diff[1] == 0
    gray_diff = (out.gray_logits - base.gray_logits).abs().amax(dim=(0, 2))  # (Lg,)
    assert torch.all(gray_diff[: j + 1] == 0) and torch.all(gray_diff[j + 1 :] > 0)
    # gray rows never see text or image tokens
    text2, image2 = text.clone(), image.clone()
    text2[:, 2] += 1
    image2[:, 0] = (image2[:, 0] + 1) % model.config.image_vocab_size
    assert torch.equal(model(text2, image2, gray, use).gray_logits, base.gray_logits)


def test_gray_segment_skipped_equals_included_but_off():
    model = _model()
    text, image, gray = _batch(model.config)
    skipped = model(text, image)
    off = model(text, image, gray, torch.zeros(3, dtype=torch.bool))
    mixed = model(text, image, gray, torch.tensor([True, False, True]))
    for o in (off, mixed):
        assert torch.allclose(o.text_logits, skipped.text_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(off.image_logits, skipped.image_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.image_logits[1], skipped.image_logits[1], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed.image_logits[0], skipped.image_logits[0], atol=1e-3)


def test_bad_inputs_raise():
    model = _model()
    text, image, gray = _batch(model.config)
    with pytest.raises(ValueError, match="pass gray"):
        model(text, image, None, torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="LongTensor"):
        model(text.float(), image)
    with pytest.raises(ValueError, match="tokens >"):
        model(torch.cat([text, text], 1), image)
    with pytest.raises(ValueError, match="use_gray"):
        model(text, image, gray, torch.tensor([True]))


@pytest.mark.parametrize("sandwich", [True, False])
@pytest.mark.parametrize("layerscale", [True, False])
def test_sandwich_and_layerscale_switches(sandwich: bool, layerscale: bool):
    model = _model(sandwich_norm=sandwich, layerscale=layerscale)
    block = model.blocks[0]
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in block.modules())
    assert n_ln == (4 if sandwich else 2)
    assert isinstance(block.post_ln_1, nn.LayerNorm if sandwich else nn.Identity)
    has_ls = any(n.endswith("scale") for n, _ in block.named_parameters())
    assert has_ls == layerscale
    text, image, _ = _batch(model.config)
    assert torch.isfinite(model(text, image).image_logits).all()


def test_layerscale_init_rules():
    small = dict(n_head=2, n_embd=8, text_vocab_size=64, image_vocab_size=8, text_eot_token=63)
    layer = SemaniGPT(GPTConfig.tiny(n_layer=24, **small))
    inits = [b.ls_1.scale[0].item() for b in layer.blocks]
    assert inits[:18] == [pytest.approx(0.1)] * 18 and inits[18:] == [pytest.approx(1e-5)] * 6
    depth = SemaniGPT(GPTConfig.tiny(n_layer=24, layerscale_rule="depth", **small))
    assert all(b.ls_2.scale[0].item() == pytest.approx(1e-5) for b in depth.blocks)
    shallow = SemaniGPT(GPTConfig.tiny(n_layer=12, layerscale_rule="depth", **small))
    assert all(b.ls_2.scale[0].item() == pytest.approx(0.1) for b in shallow.blocks)
    fixed = SemaniGPT(GPTConfig.tiny(layerscale_init=0.5, **small))
    assert fixed.blocks[1].ls_1.scale[0].item() == 0.5
    with pytest.raises(ValueError, match="layerscale_rule"):
        GPTConfig.tiny(layerscale_rule="cait")


def test_ffn_switch():
    geglu, gelu = _model(ffn="geglu"), _model(ffn="gelu", ffn_hidden=96)
    assert geglu.blocks[0].mlp.c_fc.out_features == 2 * 4 * 64
    assert gelu.blocks[0].mlp.c_fc.out_features == gelu.blocks[0].mlp.c_proj.in_features == 96
    with pytest.raises(ValueError, match="ffn"):
        GPTConfig.tiny(ffn="swiglu")


def test_optimizer_groups():
    model = _model()
    decay, no_decay = model.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert any(p is model.text_tok_emb.weight for p in decay["params"])
    assert any(p is model.bov for p in no_decay["params"])
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


def test_backward_reaches_all_parameters():
    model = _model(dropout=0.1).train()
    text, image, gray = _batch(model.config)
    out = model(text, image, gray, torch.tensor([True, False, True]))
    loss = sum(
        torch.nn.functional.cross_entropy(lg.transpose(1, 2), t)
        for lg, t in ((out.text_logits, text), (out.image_logits, image), (out.gray_logits, gray))
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert model.estimate_mfu(1, 1.0) > 0


@pytest.mark.parametrize("use", [None, (True, False, True), (False, False, False)])
def test_cached_prefill_and_steps_match_full_forward(use):
    """Prefill + single and chunked steps through the static cache = the full forward."""
    model = _model()
    cfg = model.config
    text, image, gray = _batch(cfg)
    use_gray = None if use is None else torch.tensor(use)
    g = None if use is None else gray
    full = model(text, image, g, use_gray).image_logits  # (B, Li, Vi)
    cache = model.new_kv_cache(3, with_gray=g is not None)
    k_ptr = cache.k.data_ptr()
    got = [model.prefill(text, cache, g, use_gray, image=image[:, :2])]  # predicts s_2
    pos = 2
    for n in (1, 3, 1, 5, 1):  # single tokens and forced runs
        got.append(model.step(image[:, pos : pos + n], cache))
        pos += n
    assert cache.k.data_ptr() == k_ptr and cache.length == cache.layout.image_row_start + 1 + pos
    want = full[:, [2, 3, 6, 7, 12, 13]]
    torch.testing.assert_close(torch.stack(got, 1), want, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_raises():
    cfg = GPTConfig.tiny()
    cache = KVCache(cfg, batch_size=1, max_len=4)
    k = torch.zeros(1, cfg.n_head, 5, cfg.n_embd // cfg.n_head)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, 0, k, k)
