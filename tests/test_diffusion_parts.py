"""SeMani-Diff building blocks: offline CLIP tokenizer, tiny components, offline loading."""

from pathlib import Path

import pytest
import torch

from semani.modules.diffusion_parts import (
    COMPONENTS,
    decode_latents,
    encode_text,
    load_inpaint_components,
    load_sd_components,
    offline_clip_tokenizer,
    sample_latents,
    tiny_inpaint_components,
    vae_scale_factor,
)


@pytest.fixture(scope="module")
def parts(tok_dir: Path) -> dict:
    return tiny_inpaint_components(seed=0, tokenizer_folder=tok_dir)


@pytest.fixture(scope="module")
def saved(parts: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import StableDiffusionInpaintPipeline

    folder = tmp_path_factory.mktemp("tiny_inpaint")
    pipe = StableDiffusionInpaintPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "text", ["a photo of a red circle", "A small Bird, with  yellow wings!", "don't 42 naïve"]
)
def test_offline_tokenizer_matches_open_clip(tok_dir: Path, text: str) -> None:
    import open_clip

    tok = offline_clip_tokenizer(tok_dir)
    assert len(tok) == 49408 and tok.model_max_length == 77
    ids = tok(text).input_ids
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ids == ref[: len(ids)] and ref[len(ids) - 1] == 49407  # up to <|endoftext|>
    assert not any(ref[len(ids) :])  # open_clip pads with 0
    padded = tok(text, padding="max_length", max_length=77).input_ids
    assert padded[len(ids) :] == [49407] * (77 - len(ids))  # SD pads with <|endoftext|>


def test_offline_tokenizer_reuses_its_folder(tok_dir: Path) -> None:
    vocab = tok_dir / "vocab.json"
    before = vocab.stat().st_mtime_ns
    offline_clip_tokenizer(tok_dir)
    assert vocab.stat().st_mtime_ns == before
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in tok_dir.iterdir()
    }


def test_tiny_components_seeded_and_sd_shaped(parts: dict, tok_dir: Path) -> None:
    state = torch.random.get_rng_state()
    again = tiny_inpaint_components(seed=0, tokenizer_folder=tok_dir)
    other = tiny_inpaint_components(seed=1, in_channels=4, tokenizer_folder=tok_dir)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert set(parts) == set(COMPONENTS)
    for name in ("unet", "vae", "text_encoder"):
        a, b = parts[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    w = "conv_out.weight"
    assert not torch.equal(parts["unet"].state_dict()[w], other["unet"].state_dict()[w])
    assert parts["unet"].config.in_channels == 9 and other["unet"].config.in_channels == 4
    assert vae_scale_factor(parts["vae"]) == 8
    assert parts["text_encoder"].config.vocab_size == 49408
    sched = parts["scheduler"].config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert sched.num_train_timesteps == 1000


def test_shared_operations_shapes(parts: dict) -> None:
    with torch.no_grad():
        states = encode_text(parts["text_encoder"], parts["tokenizer"], ["a bird", ""])
        assert states.shape == (2, 77, 32)
        x = torch.rand(1, 3, 24, 40) * 2 - 1
        posterior = parts["vae"].encode(x).latent_dist
        z = sample_latents(parts["vae"], posterior, torch.Generator().manual_seed(0))
        assert z.shape == (1, 4, 3, 5)
        y = decode_latents(parts["vae"], z)
    assert y.shape == (1, 3, 24, 40) and y.dtype == torch.float32
    assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_load_folder_round_trip(saved: Path, parts: dict) -> None:
    loaded = load_inpaint_components(saved)
    assert set(loaded) == set(COMPONENTS)
    for name in ("unet", "vae", "text_encoder"):
        a, b = parts[name].state_dict(), loaded[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert type(loaded["scheduler"]) is type(parts["scheduler"])
    assert (
        loaded["tokenizer"]("a red circle").input_ids
        == parts["tokenizer"]("a red circle").input_ids
    )


def test_single_file_errors_are_wrapped(tmp_path: Path, saved: Path) -> None:
    from safetensors.torch import save_file

    ckpt = tmp_path / "broken.safetensors"
    save_file({"x": torch.zeros(2)}, str(ckpt))  # no Stable-Diffusion weights in it
    with pytest.raises(OSError, match="(?s)broken.safetensors.*config="):
        load_inpaint_components(ckpt, config=saved)


def test_load_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_inpaint_components(missing)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_inpaint_components(tmp_path)  # a folder, but no diffusers save
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id, offline and not in the (empty) cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    with pytest.raises(FileNotFoundError, match="not-a-real-model is not in the Hugging Face"):
        load_sd_components("semani-tests/not-a-real-model")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_inpaint_components(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_inpaint_components(text)
