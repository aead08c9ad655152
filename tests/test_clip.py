"""ClipModel: shapes, normalisation, preprocessing, frozen weights, loading and clear errors."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from semani.data.tokenizer import TextTokenizer
from semani.modules.clip import TINY_CLIP_NAME, ClipModel, resolve_pretrained


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    torch.manual_seed(0)
    return ClipModel(TINY_CLIP_NAME)


def test_tiny_config_is_registered_with_open_clip(clip: ClipModel) -> None:
    assert TINY_CLIP_NAME in open_clip.list_models()
    assert clip.image_size == (32, 32) and clip.context_length == 77 and clip.embed_dim == 32


def test_encode_shapes_and_normalisation(clip: ClipModel) -> None:
    images = torch.rand(3, 3, 64, 48) * 2 - 1
    emb = clip.encode_image(images)
    assert emb.shape == (3, clip.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    raw = clip.encode_image(images, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), emb)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))

    txt = clip.encode_text(["a red square", "a blue circle on a green background"])
    assert txt.shape == (2, clip.embed_dim)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(clip.similarity(images[:2], ["a", "b"]).shape, torch.Size([2]))

    tokens = clip.encode_image_tokens(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (2, (32 // 8) ** 2, clip.embed_dim)  # 4x4 patches, projected
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 16))


def test_preprocess_is_clip_normalisation_and_resize(clip: ClipModel) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # already the input size: normalisation only
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip.preprocess(x), ((x + 1) / 2 - mean) / std)
    # 64x48: the shorter side goes to 32 (bicubic), then a centre crop of the longer one
    y = torch.rand(1, 3, 64, 48) * 2 - 1
    ref = F.interpolate(y, size=(43, 32), mode="bicubic", align_corners=False)[:, :, 5:37]
    torch.testing.assert_close(clip.preprocess(y), ((ref + 1) / 2 - mean) / std)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip.preprocess(torch.zeros(3, 32, 32))


def test_frozen_but_differentiable_in_the_input(clip: ClipModel) -> None:
    assert all(not p.requires_grad for p in clip.parameters())
    assert not any(m.training for m in clip.modules())
    clip.train()
    assert not clip.training and not clip.model.training and not clip.model.visual.training
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    clip.similarity(x, ["a red square", "a blue circle"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_text_tokens_and_strings_agree(clip: ClipModel) -> None:
    texts = ["a small red circle", "word " * 100]  # the second is truncated
    tok128 = TextTokenizer(128)(texts)
    fitted = clip.fit_context(tok128)
    torch.testing.assert_close(fitted, open_clip.tokenize(texts, context_length=77))
    assert fitted[1, -1] == 49407  # truncation keeps EOT
    torch.testing.assert_close(clip.encode_text(tok128), clip.encode_text(texts))
    short = TextTokenizer(32)(texts[:1])  # shorter than 77: zero padded
    torch.testing.assert_close(clip.encode_text(short), clip.encode_text(texts[:1]))


def test_local_checkpoint_roundtrip(clip: ClipModel, tmp_path: Path) -> None:
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.model.state_dict(), path)
    torch.manual_seed(123)
    other = ClipModel(TINY_CLIP_NAME)  # a different random init ...
    loaded = ClipModel(TINY_CLIP_NAME, pretrained=str(path))  # ... and the saved weights
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_image(x), clip.encode_image(x))
    torch.testing.assert_close(loaded.encode_text(["abc"]), clip.encode_text(["abc"]))
    assert not torch.allclose(other.encode_image(x), clip.encode_image(x))


def test_openai_torchscript_release_file_loads(clip: ClipModel, tmp_path: Path) -> None:
    """OpenAI's ViT-B-32.pt is TorchScript (torch.load(weights_only=True) refuses it)."""
    model = copy.deepcopy(clip.model)
    mask = model.attn_mask  # OpenAI's archives hold the causal mask as a constant, not a buffer
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    example = (torch.zeros(1, 3, 32, 32), clip.tokenize(["a"]))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(model, example, check_trace=False, strict=False).save(str(path))
    loaded = ClipModel(TINY_CLIP_NAME, pretrained=str(path))
    ref = clip.model.state_dict()
    got = loaded.model.state_dict()
    assert set(ref) == set(got)
    for key in ref:  # open_clip rebuilds OpenAI models through fp16 (their release precision)
        torch.testing.assert_close(got[key], ref[key], rtol=1e-3, atol=1e-4, msg=key)


def test_hub_tag_without_weights_fails_fast_and_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, and the caches are empty
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache") as err:
        ClipModel("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    assert "pass pretrained=" in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - start < 5.0  # no network retries
    with pytest.raises(FileNotFoundError, match="not an open_clip pretrained tag"):
        ClipModel(TINY_CLIP_NAME, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="CLIP-ViT-B-32-laion2B-s34B-b79K is not in"):
        ClipModel("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_cached_tag_resolves_to_the_local_file(tmp_path: Path) -> None:
    cached = tmp_path / "ViT-B-32.pt"  # where open_clip caches OpenAI's url download
    cached.write_bytes(b"not loaded by this test")
    path, tag_cfg = resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert path == str(cached) and tag_cfg["quick_gelu"] is True
    assert resolve_pretrained("ViT-B-32", None) == (None, {})
