"""Hub ids and open_clip tags, loaded from a Hugging Face cache the test fills, offline.

Each loader (Stable-Diffusion components, the Mask2Former and SAM segmenters, `ClipModel` with
an open_clip tag) gets a tiny random model written into a cache in the real layout
(`models--<org>--<name>/{blobs,snapshots/<sha>,refs/main}`), then loads it by id with
`HF_HUB_OFFLINE=1` in the environment only (huggingface_hub read it at import time without it:
the loaders must pass `local_files_only` themselves). With an empty cache the error is one line
naming the id and the folder to pass. Sockets are closed for the whole module: nothing here
may reach the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from semani.utils.hub import (
    HubDownloadError,
    NotInCacheError,
    hub_cache_dir,
    is_offline,
    looks_like_hub_id,
)

SHA = "0123456789abcdef0123456789abcdef01234567"  # the cached commit
SD_ID = "stabilityai/stable-diffusion-2-inpainting"
M2F_ID = "facebook/mask2former-swin-large-coco-panoptic"
SAM_ID = "facebook/sam-vit-base"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Any connection or name lookup fails at once (no test may wait on a network), and a test
    during which anything tried one fails (a library falling back to its cache after a refused
    request would hide that `local_files_only` was not passed)."""
    tried: list[str] = []

    def refuse(*args, **kwargs):
        tried.append(f"{args[:1]} from\n{''.join(traceback.format_stack(limit=12))}")
        raise OSError("the network is closed in tests/test_hub_loading.py")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not tried, f"network access attempted: {tried}"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache in tmp, offline by the environment only (huggingface_hub
    read `HF_HUB_OFFLINE` unset at import: its flag is restored after the test)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (home / "hub").mkdir(parents=True)
    assert is_offline() and hub_cache_dir() == str(home / "hub")
    return home / "hub"


def fill_cache(cache: Path, repo_id: str, files: Path | dict[str, Path]) -> Path:
    """Write `files` (a folder, or {name in the repo: local file}) into `cache` as
    huggingface_hub does: content-addressed blobs, the snapshot of commit `SHA` made of relative
    symlinks to them, and `refs/main` naming the commit. Returns the snapshot folder."""
    if isinstance(files, Path):
        files = {str(p.relative_to(files)): p for p in sorted(files.rglob("*")) if p.is_file()}
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_one_line(err: BaseException, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


# -- the helpers ----------------------------------------------------------------------------------
def test_offline_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert is_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert is_offline()


def test_offline_scope_sets_huggingface_hubs_flag_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    from semani.utils.hub import offline_scope

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as if imported while online
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with offline_scope() as offline:
        assert offline is False and constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with offline_scope() as offline:
        assert offline is True and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_config_offline_key_sets_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from semani.utils.task_utils import extras

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # both restored after the test
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    extras(OmegaConf.create({"offline": False, "extras": None}))
    assert not is_offline()
    extras(OmegaConf.create({"offline": True, "extras": None}))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert is_offline() and constants.HF_HUB_OFFLINE is True


@pytest.mark.parametrize(
    "text, expected",
    [
        (SD_ID, True),
        ("facebook/sam-vit-base", True),
        ("pretrained/clip/RN50.pt", False),
        ("./org/name", False),
        ("/abs/folder", False),
        ("~/models/x", False),
        ("a/b/c", False),
        ("openai", False),
    ],
)
def test_looks_like_hub_id(text: str, expected: bool) -> None:
    assert looks_like_hub_id(text) is expected


def test_top_configs_have_the_offline_key() -> None:
    from tests.conftest import CONFIG_DIR

    for name in ("train", "eval", "manipulate", "app"):
        cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
        assert cfg.offline is False, name


# -- Stable Diffusion -----------------------------------------------------------------------------
def test_sd_components_from_a_cached_hub_id(hf_cache: Path, inpaint_folder: Path) -> None:
    from semani.manipulation.diff_editor import DiffEditor
    from semani.modules.diffusion_parts import load_sd_components

    snapshot = fill_cache(hf_cache, SD_ID, inpaint_folder)
    ref = load_sd_components(inpaint_folder)
    parts = load_sd_components(SD_ID)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(parts[name], ref[name])
    assert parts["tokenizer"]("a bird").input_ids == ref["tokenizer"]("a bird").input_ids
    assert Path(parts["unet"].config._name_or_path).resolve() == snapshot.resolve()

    editor = DiffEditor.from_pretrained(SD_ID)
    assert_same_weights(editor.unet, ref["unet"])


def test_sd_hub_id_not_cached_offline_is_one_line(hf_cache: Path) -> None:
    from semani.modules.diffusion_parts import load_sd_components

    with pytest.raises(NotInCacheError) as err:
        load_sd_components(SD_ID)
    assert_one_line(
        err.value,
        f"{SD_ID} is not in the Hugging Face cache ({hf_cache})",
        "HF_HUB_OFFLINE=1",
        f"download {SD_ID} --local-dir pretrained/stable-diffusion-2-inpainting",
        "pass pretrained/stable-diffusion-2-inpainting instead of",
    )
    with pytest.raises(NotInCacheError) as err:  # the caller names its config key
        load_sd_components(SD_ID, what="editor.source")
    assert "pass editor.source=pretrained/stable-diffusion-2-inpainting" in str(err.value)


def test_sd_online_failure_names_the_id(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiffusionPipeline

    from semani.modules.diffusion_parts import load_sd_components

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: diffusers is asked, and fails

    def fail(*args, **kwargs):
        raise OSError("Cannot reach https://huggingface.co/api/models/x\nsecond line")

    monkeypatch.setattr(DiffusionPipeline, "download", fail)
    with pytest.raises(HubDownloadError) as err:
        load_sd_components(SD_ID)
    assert_one_line(err.value, f"could not download {SD_ID}", "OSError: Cannot reach")


# -- segmenters -----------------------------------------------------------------------------------
def test_mask2former_from_a_cached_hub_id(hf_cache: Path, tmp_path: Path) -> None:
    from transformers import Mask2FormerForUniversalSegmentation

    from semani.alignment.segmenters import build_segmenter
    from tests.test_segmenters import tiny_mask2former

    folder = tiny_mask2former(tmp_path / "tiny_m2f")
    fill_cache(hf_cache, M2F_ID, folder)
    seg = build_segmenter("mask2former", model_name_or_path=M2F_ID)
    assert_same_weights(seg.model, Mask2FormerForUniversalSegmentation.from_pretrained(folder))
    props = seg.segment(torch.rand(3, 48, 80) * 2 - 1)
    assert props.masks.shape[1:] == (48, 80)


def test_sam_from_a_cached_hub_id(hf_cache: Path, tmp_path: Path) -> None:
    from transformers import SamModel

    from semani.alignment.segmenters import build_segmenter
    from tests.test_segmenters import tiny_sam

    folder = tiny_sam(tmp_path / "tiny_sam")
    fill_cache(hf_cache, SAM_ID, folder)
    seg = build_segmenter("sam", model_name_or_path=SAM_ID, points_per_side=2)
    assert_same_weights(seg.model, SamModel.from_pretrained(folder))


@pytest.mark.parametrize("name, repo_id", [("mask2former", M2F_ID), ("sam", SAM_ID)])
def test_segmenter_hub_id_not_cached_offline_is_one_line(
    hf_cache: Path, name: str, repo_id: str
) -> None:
    from semani.alignment.segmenters import ModelNotFoundError, build_segmenter

    with pytest.raises(ModelNotFoundError) as err:
        build_segmenter(name, model_name_or_path=repo_id)
    folder = f"pretrained/{repo_id.split('/')[1]}"
    assert_one_line(
        err.value,
        f"{repo_id} is not in the Hugging Face cache",
        f"--local-dir {folder}",
        f"pass model_name_or_path={folder}",
    )


def test_segmenter_online_failure_names_the_id(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers re-raises huggingface_hub's RepositoryNotFoundError as an OSError: one
    line naming the id, with the fix for a missing repository."""
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError
    from transformers import AutoConfig

    from semani.alignment.segmenters import build_segmenter

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def not_found(name, **kwargs):
        assert kwargs["local_files_only"] is False and kwargs["cache_dir"] == str(hf_cache)
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{name}")
        response = httpx2.Response(404, request=request)
        try:
            raise RepositoryNotFoundError(
                "404 Client Error.\nRepository Not Found", response=response
            )
        except RepositoryNotFoundError as err:
            raise OSError(f"{name} is not a valid model identifier\nmore lines") from err

    monkeypatch.setattr(AutoConfig, "from_pretrained", not_found)
    with pytest.raises(HubDownloadError) as err:
        build_segmenter("mask2former", model_name_or_path="facebook/no-such-model")
    assert_one_line(
        err.value,
        "could not download model_name_or_path=facebook/no-such-model",
        "not a valid model identifier",
        "no such repository",
    )


def test_allow_download_is_a_deprecated_no_op(hf_cache: Path, tmp_path: Path) -> None:
    from semani.alignment.segmenters import build_segmenter
    from tests.test_segmenters import tiny_mask2former

    fill_cache(hf_cache, M2F_ID, tiny_mask2former(tmp_path / "tiny_m2f"))
    with pytest.warns(FutureWarning, match="allow_download is deprecated"):
        build_segmenter("mask2former", model_name_or_path=M2F_ID, allow_download=False)


# -- open_clip tags -------------------------------------------------------------------------------
def _tag_file(model: str, tag: str) -> tuple[dict, str, str]:
    """The open_clip tag's config, hub repo and the file open_clip reads first (its
    safetensors name when the entry names none, as open_clip's download_pretrained)."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo_id, filename = os.path.split(cfg["hf_hub"])
    return cfg, repo_id, filename or HF_SAFE_WEIGHTS_NAME


@pytest.fixture
def tiny_openai_tag(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """The tiny CLIP given ViT-B-16's "openai" tag (same hub repo and file, quick GELU): the
    weights of a real ViT-B-16 would be 600 MB."""
    import open_clip

    from semani.modules.clip import TINY_CLIP_NAME

    cfg, repo_id, filename = _tag_file("ViT-B-16", "openai")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_CLIP_NAME, {"openai": cfg})
    return TINY_CLIP_NAME, repo_id, filename


def test_clip_tag_from_the_hub_cache(
    hf_cache: Path, tmp_path: Path, tiny_openai_tag, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from semani.modules.clip import ClipModel

    name, repo_id, filename = tiny_openai_tag
    assert repo_id == "timm/vit_base_patch16_clip_224.openai"
    torch.manual_seed(1)
    tiny = open_clip.create_model(name, force_quick_gelu=True)
    weights = tmp_path / filename
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(weights))
    snapshot = fill_cache(hf_cache, repo_id, {filename: weights})

    clip = ClipModel(name, pretrained="openai")
    assert_same_weights(clip.model, tiny)
    # the very file open_clip itself resolves the tag to (its own hub call, offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_pretrained_cfg(name, "openai")
    assert Path(open_clip.pretrained.download_pretrained(cfg)) == snapshot / filename


@pytest.mark.parametrize("model", ["ViT-B-16", "RN50"])
def test_clip_tag_not_cached_offline_is_one_line(hf_cache: Path, model: str) -> None:
    from semani.metrics.clip_metrics import load_clip
    from semani.modules.clip import ClipModel

    _, repo_id, filename = _tag_file(model, "openai")
    with pytest.raises(NotInCacheError) as err:
        ClipModel(model, pretrained="openai")
    folder = f"pretrained/clip/{repo_id.split('/')[1]}"
    assert_one_line(
        err.value,
        f"CLIP weights {model}/openai",
        f"{repo_id} ({filename}) is not in the Hugging Face cache ({hf_cache})",
        f"download {repo_id} {filename} --local-dir {folder}",
        f"pass pretrained={folder}/{filename}",
    )
    with pytest.raises(NotInCacheError):  # the metrics' loader, the same way
        load_clip(model, "openai")


def test_clip_hub_id_weights(hf_cache: Path, tmp_path: Path) -> None:
    """`pretrained=<org/name>`: a hub repository holding open_clip weights."""
    import open_clip
    from safetensors.torch import save_file

    from semani.metrics.clip_metrics import load_clip
    from semani.modules.clip import TINY_CLIP_NAME

    torch.manual_seed(2)
    tiny = open_clip.create_model(TINY_CLIP_NAME)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(weights))
    fill_cache(hf_cache, "semani-tests/tiny-clip", {weights.name: weights})
    assert_same_weights(load_clip(TINY_CLIP_NAME, "semani-tests/tiny-clip").model, tiny)
    with pytest.raises(NotInCacheError, match="semani-tests/no-clip"):
        load_clip(TINY_CLIP_NAME, "semani-tests/no-clip")
