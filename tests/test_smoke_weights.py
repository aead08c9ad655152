"""Smoke weights (`semani.evaluation.smoke_weights`): resumable, atomic writing (fast, with tiny
builders), and each real-size component read back through the project's own loading path, from
the paper configs (slow: gigabytes of random weights and minutes of CPU)."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from semani.evaluation.smoke_weights import (
    COMPONENTS,
    RECORD,
    build_paper_weights,
)
from semani.utils.weight_files import REGISTRY
from tests.conftest import CONFIG_DIR
from tests.test_vqgan import F16_DDCONFIG


def _quiet(message: str) -> None:
    """A `log` that drops the progress lines."""


def _compose(root: Path, *overrides: str):
    """The configs composed with the real paths group, reading the pretrained folder `root`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import semani.utils.resolvers  # noqa: F401  (registers ${semani.abspath:})

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(overrides=["+paths=default", f"paths.pretrained_dir={root}", *overrides])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _image(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """(3, h, w) in [-1, 1]."""
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def pretrained(tmp_path: Path) -> Iterator[Path]:
    """A pretrained folder, deleted afterwards (gigabytes: not left to pytest's kept tmp dirs)."""
    root = tmp_path / "pretrained"
    yield root
    gc.collect()
    shutil.rmtree(root, ignore_errors=True)


def _build(root: Path, name: str) -> dict:
    """Build `name` into `root`: its required files are there, no staging folder is left."""
    result = build_paper_weights(root, only=[name], log=_quiet)[name]
    assert set(result["files"]) >= set(COMPONENTS[name].required)
    assert json.loads((root / RECORD).read_text())[name]["params"] == result["params"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    gc.collect()
    return result


# -- writing (fast) -------------------------------------------------------------------------------
def test_components_write_the_registry_targets() -> None:
    targets = {e.name: e.target for e in REGISTRY}
    assert set(COMPONENTS) <= set(targets)
    for name, component in COMPONENTS.items():
        for path in component.targets + component.required:
            assert path == targets[name] or path.startswith(targets[name] + "/"), (name, path)


def _tiny(written: list[str], fail: bool = False):
    """A builder that writes a small file for each required file of its component, recording
    its calls; `fail`: it raises after writing."""

    def build(component, out: Path, seed: int) -> dict[str, int]:
        written.append(component.name)
        for rel in component.required:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.full((2,), float(seed))}, out / rel)
        if fail:
            raise RuntimeError(f"{component.name} failed half-way")
        return {"part": 2}

    return build


def _patch(monkeypatch: pytest.MonkeyPatch, name: str, build) -> None:
    component = COMPONENTS[name]
    tiny = dataclasses.replace(component, build=lambda out, seed: build(component, out, seed))
    monkeypatch.setitem(COMPONENTS, name, tiny)


def test_present_components_are_skipped_and_a_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, calls = tmp_path / "pretrained", []
    for name in ("inception-birds", "mask2former", "ovseg"):
        _patch(monkeypatch, name, _tiny(calls))
    stale = root / ".ovseg.999999999.abcd.tmp"  # a staging folder of a process that is gone
    stale.mkdir(parents=True)
    lines: list[str] = []

    out = build_paper_weights(
        root, only=["mask2former", "inception-birds"], seed=3, log=lines.append
    )
    assert calls == list(out) == ["mask2former", "inception-birds"]  # the registry's order
    assert out["inception-birds"]["files"] == ["inception/stackgan_birds_inception_v3.pth"]
    assert out["mask2former"]["files"] == [
        f"mask2former-swin-large-coco-panoptic/{f}"
        for f in ("config.json", "model.safetensors", "preprocessor_config.json")
    ]
    assert out["mask2former"]["params"] == {"part": 2} and out["mask2former"]["seconds"] >= 0
    record = json.loads((root / RECORD).read_text())
    assert set(record) == {"mask2former", "inception-birds"} and record["mask2former"]["seed"] == 3
    assert any("mask2former: wrote 3 files" in line for line in lines)

    # present: skipped, the recorded entry returned
    again = build_paper_weights(root, only=["inception-birds"], log=_quiet)
    assert calls == ["mask2former", "inception-birds"]
    assert again["inception-birds"]["skipped"] and again["inception-birds"]["params"] == {
        "part": 2
    }

    # a builder that fails half-way: raised, nothing under the final name, no staging left over
    _patch(monkeypatch, "ovseg", _tiny(calls, fail=True))
    with pytest.raises(RuntimeError, match="failed half-way"):
        build_paper_weights(root, only=["ovseg"], log=_quiet)
    assert not (root / "ovseg").exists() and not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == [
        RECORD, "inception", "mask2former-swin-large-coco-panoptic",
    ]  # fmt: skip
    assert set(json.loads((root / RECORD).read_text())) == {"mask2former", "inception-birds"}

    # a folder missing one of its files is rebuilt (and replaced whole)
    (root / "mask2former-swin-large-coco-panoptic" / "model.safetensors").unlink()
    build_paper_weights(root, only=["mask2former", "inception-birds"], log=_quiet)
    assert calls[-1] == "mask2former" and calls.count("inception-birds") == 1
    with pytest.raises(ValueError, match=r"no smoke-weight builder for \['lpips-vgg'\]"):
        build_paper_weights(root, only=["lpips-vgg"], log=_quiet)


def test_a_seed_writes_the_same_weights_and_keeps_the_global_rng(tmp_path: Path) -> None:
    build = COMPONENTS["inception-flowers"]
    state = torch.random.get_rng_state()
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / folder).mkdir()
        assert build(tmp_path / folder, seed) == {"inception": 24_402_442}
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b, c = (
        torch.load(tmp_path / f / "inception/stackgan_flowers_inception_v3.pth", weights_only=True)
        for f in ("a", "b", "c")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["Conv2d_1a_3x3.conv.weight"], c["Conv2d_1a_3x3.conv.weight"])


# -- each component at real size, through the project's loaders (slow) --------------------------
@pytest.mark.slow
def test_vqgan_is_taming_s_release_and_loads_as_semani_trans_tokenizer(pretrained: Path) -> None:
    from semani.models.semani_trans import build_frozen_vqgan
    from semani.models.vqgan import VQGANModule

    result = _build(pretrained, "vqgan-imagenet-f16-1024")
    assert result["params"] == {
        "vqgan": 72_141_699, "discriminator": 2_765_633, "lpips": 14_716_160,
    }  # fmt: skip
    written = OmegaConf.load(pretrained / "vqgan_imagenet_f16_1024/configs/model.yaml")
    assert OmegaConf.to_container(written.model.params.ddconfig) == F16_DDCONFIG  # taming's
    assert written.model.params.n_embed == 1024 and written.model.params.embed_dim == 256

    # the release's loss keys: the project's own loss has the same discriminator
    sd = torch.load(pretrained / "vqgan_imagenet_f16_1024/ckpts/last.ckpt", weights_only=True)[
        "state_dict"
    ]
    ours = VQGANModule(F16_DDCONFIG, 1024, 256, loss={"disc_start": 1, "perceptual_weight": 0})
    assert set(ours.state_dict()) < set(sd)
    assert {k.split(".")[1] for k in sd if k.startswith("loss.")} == {
        "discriminator", "perceptual_loss",
    }  # fmt: skip
    assert "loss.perceptual_loss.lin0.model.1.weight" in sd
    del sd, ours

    cfg = _compose(pretrained, "+model=semani_trans")
    vq, reloadable = build_frozen_vqgan(OmegaConf.to_container(cfg.model.vqgan, resolve=True))
    assert reloadable and _count(vq) == 72_141_699 and vq.loss is None
    x = _image(256, 256)[None]  # (1, 3, 256, 256)
    with torch.no_grad():
        tokens = vq.encode_to_tokens(x)
        assert tokens.shape == (1, 16, 16) and int(tokens.max()) < 1024
        assert vq.decode_tokens(tokens).shape == (1, 3, 256, 256)


def _clip_b32(cfg):
    from semani.modules.clip import ClipModel

    return ClipModel(**cfg.model.clip)


def _clip_b16(cfg):
    scorer = hydra.utils.instantiate(cfg.alignment.scorer)  # TokenWiseScorer
    return scorer.clip


def _clip_rn50(cfg):
    from semani.metrics.clip_metrics import load_clip

    return load_clip(cfg.metrics.clip_model, cfg.metrics.clip_pretrained)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, config, load, params, dim",
    [
        ("clip-vit-b32", "+model=semani_trans", _clip_b32, 151_277_313, 512),
        ("clip-vit-b16", "+alignment/scorer=token_wise", _clip_b16, 149_620_737, 512),
        ("clip-rn50", "+metrics=coco", _clip_rn50, 102_007_137, 1024),
    ],
    ids=["vit-b32", "vit-b16", "rn50"],
)
def test_openai_clip_files_load_as_the_configs_read_them(
    pretrained: Path, name: str, config: str, load, params: int, dim: int
) -> None:
    import open_clip

    assert _build(pretrained, name)["params"] == {"clip": params}
    (path,) = COMPONENTS[name].targets
    archive = torch.jit.load(str(pretrained / path), map_location="cpu")  # as OpenAI's release
    assert {v.dtype for v in archive.state_dict().values() if v.is_floating_point()} == {
        torch.float16
    }
    del archive
    clip = load(_compose(pretrained, config))
    assert _count(clip.model) == params
    assert isinstance(
        clip.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU
    )
    with torch.no_grad():
        img = clip.encode_image(torch.stack([_image(), _image(seed=1)]))
        txt = clip.encode_text(["a red bird", "a yellow flower"])
    assert img.shape == (2, dim) and txt.shape == (2, dim) and torch.isfinite(img).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, config, in_channels, unet",
    [
        ("sd2-inpainting", "+editor=semani_diff", 9, 865_925_124),
        ("sd2-base", "+editor=blended_ldm", 4, 865_910_724),
    ],
    ids=["inpainting", "base"],
)
def test_sd2_folders_load_as_the_editors_read_them(
    pretrained: Path, name: str, config: str, in_channels: int, unet: int
) -> None:
    from diffusers import PNDMScheduler

    from semani.modules.diffusion_parts import decode_latents, encode_text, load_sd_components

    params = _build(pretrained, name)["params"]
    assert params == {"unet": unet, "vae": 83_653_863, "text_encoder": 340_387_840}
    source = _compose(pretrained, config).editor.source
    assert Path(source) == pretrained / COMPONENTS[name].targets[0]
    parts = load_sd_components(source, inpaint=in_channels == 9)
    assert {k: _count(parts[k]) for k in params} == params
    assert parts["unet"].config.in_channels == in_channels
    assert parts["unet"].config.cross_attention_dim == 1024
    assert parts["text_encoder"].config.num_hidden_layers == 23
    assert parts["tokenizer"].pad_token == "!" and parts["tokenizer"].model_max_length == 77
    scheduler = parts["scheduler"]
    assert isinstance(scheduler, PNDMScheduler) and scheduler.config.steps_offset == 1
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"
    with torch.no_grad():
        text = encode_text(parts["text_encoder"], parts["tokenizer"], ["a bird"])  # (1, 77, 1024)
        assert text.shape == (1, 77, 1024)
        latents = torch.randn(1, in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        eps = parts["unet"](latents, 999, encoder_hidden_states=text).sample
        assert eps.shape == (1, 4, 16, 16)
        assert decode_latents(parts["vae"], latents[:, :4]).shape == (1, 3, 128, 128)


@pytest.mark.slow
def test_ovseg_checkpoint_loads_in_its_segmenter_and_its_scorer(pretrained: Path) -> None:
    from semani.alignment.segmenters import build_segmenter
    from semani.alignment.segmenters.ovseg import OVSegSegmenter
    from semani.alignment.types import EntityProposals

    params = _build(pretrained, "ovseg")["params"]
    assert params == {
        "maskformer": 102_840_952, "void": 768, "clip": 427_616_513, "mask_prompt": 786_432,
    }  # fmt: skip
    # the vocabulary through OVSeg's CLIP costs 14 prompts a name: two names here
    overrides = ["vocabulary=[bird,tree]", "threshold=0.0", "min_size=320"]
    cfg = _compose(
        pretrained, "+alignment/segmenter=ovseg", *(f"alignment.segmenter.{o}" for o in overrides)
    )
    seg = build_segmenter(cfg.alignment.segmenter)
    assert isinstance(seg, OVSegSegmenter) and _count(seg.model) == 102_840_952
    assert seg.text_embeddings.shape == (2, 768)
    props = seg.segment(_image(96, 128))
    assert props.masks.shape[1:] == (96, 128) and len(props) <= 5
    del seg
    gc.collect()

    cfg = _compose(pretrained, "+alignment/scorer=mask_prompt")
    scorer = hydra.utils.instantiate(cfg.alignment.scorer)  # MaskPromptScorer
    assert _count(scorer.model.clip.model) == 427_616_513
    assert scorer.model.mask_embedding.shape == (3, 256, 1024)
    assert scorer.model.mask_embedding.abs().sum() > 0  # the checkpoint's, not the zero start
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 10:50, 20:70], masks[1, 40:90, 60:120] = True, True
    with torch.no_grad():
        scores = scorer(_image(96, 128), EntityProposals(masks, torch.ones(2)), "bird")
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_mask2former_folder_loads_in_its_segmenter(pretrained: Path) -> None:
    from semani.alignment.segmenters import build_segmenter

    assert _build(pretrained, "mask2former")["params"] == {"mask2former": 215_538_682}
    cfg = _compose(
        pretrained, "+alignment/segmenter=mask2former", "alignment.segmenter.threshold=0.0"
    )
    seg = build_segmenter(cfg.alignment.segmenter)
    config = seg.model.config
    assert _count(seg.model) == 215_538_682 and config.num_queries == 200
    assert config.num_labels == 133 and config.id2label[132] == "rug-merged"
    backbone = config.backbone_config
    assert (backbone.embed_dim, backbone.depths, backbone.num_heads) == (
        192, [2, 2, 18, 2], [6, 12, 24, 48],
    )  # fmt: skip
    assert (backbone.window_size, backbone.image_size) == (12, 384)
    assert seg.processor.size == {"shortest_edge": 384, "longest_edge": 1333}
    props = seg.segment(_image(96, 128))
    assert props.masks.shape[1:] == (96, 128)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, config, params, outputs",
    [
        ("inception-coco", "+metrics=coco", 23_850_960, 1008),
        ("inception-birds", "+metrics=cub", 24_486_982, 51),
        ("inception-flowers", "+metrics=oxford", 24_402_442, 21),
    ],
    ids=["coco", "birds", "flowers"],
)
def test_inceptions_load_as_the_metrics_read_them(
    pretrained: Path, name: str, config: str, params: int, outputs: int
) -> None:
    assert _build(pretrained, name)["params"] == {"inception": params}
    classifier = hydra.utils.instantiate(_compose(pretrained, config).metrics.classifier)
    assert _count(classifier) == params
    with torch.no_grad():
        logits = classifier(torch.stack([_image(), _image(seed=1)]))
    assert logits.shape == (2, outputs) and torch.isfinite(logits).all()
