"""Real released weights from `pretrained/` (marked slow; `make test-all` runs them).

Each test skips, naming the file it needs, when the weights are absent (the tests read
`pretrained/` only; `python scripts/download_weights.py` fetches them). Put them where the
README's "Pretrained weights" says:

- `pretrained/vqgan_imagenet_f16_1024/{ckpts/last.ckpt,configs/model.yaml}` (taming);
- `pretrained/clip/ViT-B-32.pt` (OpenAI's CLIP release file).

`SEMANI_PRETRAINED` points the tests at another folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PRETRAINED = Path(os.environ.get("SEMANI_PRETRAINED", REPO_ROOT / "pretrained"))
TAMING_CKPT = PRETRAINED / "vqgan_imagenet_f16_1024" / "ckpts" / "last.ckpt"
TAMING_YAML = PRETRAINED / "vqgan_imagenet_f16_1024" / "configs" / "model.yaml"
CLIP_FILE = PRETRAINED / "clip" / "ViT-B-32.pt"


def _need(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            pytest.skip(f"needs the released weights at {path} (see README, Pretrained weights)")


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: smooth colour fields (upsampled noise), natural-ish."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_official_taming_f16_vqgan_loads_and_reconstructs() -> None:
    _need(TAMING_CKPT, TAMING_YAML)
    from semani.models.vqgan import VQGANModule

    vq = VQGANModule.from_taming(TAMING_CKPT, TAMING_YAML).eval()
    assert vq.n_embed == 1024 and vq.downsample_factor == 16
    x = _smooth_images(2, 256)
    with torch.inference_mode():
        tokens = vq.encode_to_tokens(x)
        rec = vq.decode_tokens(tokens)
    assert tokens.shape == (2, 16, 16) and int(tokens.max()) < 1024
    assert len(tokens.unique()) > 8  # the codebook is used, not one code
    assert (rec - x).abs().mean() < 0.15  # the released model reconstructs smooth images


def test_official_clip_vit_b32_knows_colours() -> None:
    """OpenAI's ViT-B/32 names the colour of a flat-coloured image far above chance."""
    _need(CLIP_FILE)
    from semani.modules.clip import ClipModel

    clip = ClipModel("ViT-B-32", pretrained=str(CLIP_FILE))
    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
               "yellow": (1, 1, -1), "white": (1, 1, 1), "black": (-1, -1, -1)}  # fmt: skip
    images = torch.stack(
        [
            torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 224, 224)
            for rgb in colours.values()
        ]  # fmt: skip
    )
    with torch.inference_mode():
        img = clip.encode_image(images)  # (6, 512), normalised
        txt = clip.encode_text([f"a photo of the colour {c}." for c in colours])
    assert img.shape == (6, 512)
    accuracy = (img @ txt.T).argmax(1).eq(torch.arange(6)).float().mean()
    assert accuracy >= 5 / 6  # chance: 1/6
