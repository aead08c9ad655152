"""Shared fixtures: a tiny ShapesWorld data set written once per test session."""

from pathlib import Path

import pytest
import torch

import semani  # noqa: F401  (registers the config resolvers, e.g. ${semani.abspath:...})


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    # Tiny models gain nothing from a second thread, and when the cores are busy OpenMP
    # spin-waits make thousands of tiny ops ~50x slower: the whole suite runs single-threaded.
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """semani's on-disk cache (semani.utils.disk_cache) in the session's temporary folder, not
    the user's ~/.cache."""
    import os

    os.environ["SEMANI_CACHE_DIR"] = str(tmp_path_factory.mktemp("semani_cache"))


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ShapesWorld data set (32 train / 8 test images, 64 px) in the CUB-like layout."""
    from semani.data.shapes_generator import generate_shapes

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(out, n_train=32, n_test=8, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline CLIP tokenizer folder (vocab.json, merges.txt from open_clip's BPE)."""
    from semani.modules.diffusion_parts import offline_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip_tokenizer")
    offline_clip_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def inpaint_folder(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """Tiny random SD-inpainting components saved as diffusers does (a model_index.json
    folder), for the SeMani-Diff editor, manipulate.py and the benchmark tests."""
    from diffusers import StableDiffusionInpaintPipeline

    from semani.modules.diffusion_parts import tiny_inpaint_components

    folder = tmp_path_factory.mktemp("tiny_inpaint")
    parts = tiny_inpaint_components(seed=0, tokenizer_folder=tok_dir)
    StableDiffusionInpaintPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text2image_folder(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """Tiny random SD text-to-image components (4-channel UNet, for Blended-LDM), saved as
    diffusers does."""
    from diffusers import StableDiffusionPipeline

    from semani.modules.diffusion_parts import tiny_inpaint_components

    folder = tmp_path_factory.mktemp("tiny_t2i")
    parts = tiny_inpaint_components(seed=0, in_channels=4, tokenizer_folder=tok_dir)
    StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(folder)
    return folder


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO_ROOT = CONFIG_DIR.parent


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules: dataclasses look it up)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def compose(config_name: str, overrides: list[str], output_dir: Path | None = None):
    """Compose a real config of ``configs/`` as ``train.py``/``eval.py`` would, for in-process use.

    Hydra's runtime node is kept so that ``${hydra:...}`` interpolations resolve; the output folder
    is redirected to ``output_dir`` when given.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir / "logs")
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
