"""TransTokenEditor and mask_to_token_mask: forced tokens kept, bilinear token masks, guidance."""

import pytest
import torch
import torch.nn.functional as F

from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import to_grayscale
from semani.manipulation.trans import MaskTooSmallError, TransTokenEditor, mask_to_token_mask
from semani.modules.gpt import GPTConfig, SemaniGPT

PATCH, LEVELS = 16, 4  # 64 px -> 4x4 tokens, 4^3 = 64 codes


class PatchColourCodec:
    """Stand-in for VQGANModule's token interface: one code per 16x16 patch = its mean colour
    quantised to 4 levels per channel; decoding paints the patch with that colour."""

    n_embed = LEVELS**3

    def __init__(self) -> None:
        self.encoded: list[torch.Tensor] = []

    def encode_to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded.append(images)
        mean = F.avg_pool2d(images, PATCH)  # (B, 3, h, w)
        lv = ((mean + 1) / 2 * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()
        return lv[:, 0] * LEVELS**2 + lv[:, 1] * LEVELS + lv[:, 2]  # (B, h, w)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        lv = torch.stack([tokens // LEVELS**2, tokens // LEVELS % LEVELS, tokens % LEVELS], 1)
        img = lv.float() / (LEVELS - 1) * 2 - 1  # (B, 3, h, w)
        return F.interpolate(img, scale_factor=PATCH, mode="nearest")  # (B, 3, H, W)


@pytest.fixture(scope="module")
def editor() -> TransTokenEditor:
    torch.manual_seed(0)
    gpt = SemaniGPT(GPTConfig.tiny(image_vocab_size=LEVELS**3)).eval()
    return TransTokenEditor(
        gpt, PatchColourCodec(), TextTokenizer(context_length=16), filter_thres=0.5
    )


def _images(B: int = 2) -> torch.Tensor:
    return torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_mask_to_token_mask_bilinear_not_maxpool():
    mask = torch.zeros(64, 64)
    mask[16:34, 16:48] = 1  # spills 2 px into the next token row
    tm = mask_to_token_mask(mask, (4, 4), min_tokens=0)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 1:3] = True
    assert tm.dtype == torch.bool and torch.equal(tm, expected)
    maxpool = F.adaptive_max_pool2d(mask[None, None], (4, 4))[0, 0] > 0
    assert maxpool.sum() == 4 and tm.sum() == 2  # max-pooling would dilate into row 2
    with pytest.raises(MaskTooSmallError, match="min_tokens=4"):
        mask_to_token_mask(mask, (4, 4), min_tokens=4)
    assert torch.equal(mask_to_token_mask(mask, (4, 4), min_tokens=2), expected)


def test_mask_to_token_mask_threshold_and_batch():
    mask = torch.zeros(2, 64, 64)
    mask[0, :, :40] = 1  # columns 0, 1 fully; column 2 at 8 of 16 px
    mask[1] = 1
    tm = mask_to_token_mask(mask, (4, 4), min_tokens=0)
    assert tm.shape == (2, 4, 4) and tm[1].all()
    assert tm[0, :, :2].all() and not tm[0, :, 3].any()
    high = mask_to_token_mask(mask, (4, 4), threshold=0.99, min_tokens=0)
    assert high[0].sum() == 8  # the partial column falls below a high threshold
    with pytest.raises(ValueError, match="mask must be"):
        mask_to_token_mask(torch.zeros(64), (4, 4))


def test_to_grayscale():
    img = _images(1)
    gray = to_grayscale(img)
    assert gray.shape == img.shape
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    white = torch.ones(1, 3, 2, 2)  # torchvision's luma weights sum to 0.9999
    torch.testing.assert_close(to_grayscale(white), white, atol=2e-4, rtol=0)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        to_grayscale(red)[0, :, 0, 0], torch.full((3,), 0.2989 - 0.587 - 0.114)
    )


def test_edit_keeps_tokens_and_pixels_outside_mask(editor):
    images = _images(2)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[1, 2:, :] = True
    orig, edited = editor.edit_tokens(images, mask, ["a red bird", "a blue flower"], seed=0)
    assert torch.equal(orig, editor.vqgan.encode_to_tokens(images))
    assert torch.equal(edited[~mask], orig[~mask])
    assert (edited[mask] != orig[mask]).any()
    out = editor.edit(images, mask, ["a red bird", "a blue flower"], seed=0)
    assert out.shape == images.shape
    pix_keep = (~mask).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)  # (B, 64, 64)
    recon = editor.vqgan.decode_tokens(orig)
    assert torch.equal(out.permute(0, 2, 3, 1)[pix_keep], recon.permute(0, 2, 3, 1)[pix_keep])
    assert torch.equal(out, editor(images, mask, ["a red bird", "a blue flower"], seed=0))


def test_edit_single_image_gray_guidance_and_seed(editor):
    image = _images(1)[0]
    mask = torch.ones(4, 4, dtype=torch.bool)
    editor.vqgan.encoded.clear()
    out = editor.edit(image, mask, "a small bird", gray_guidance=True, seed=3)
    assert out.shape == (3, 64, 64)
    assert len(editor.vqgan.encoded) == 2  # the image and its grayscale copy
    g = editor.vqgan.encoded[1]
    assert torch.equal(g[:, 0], g[:, 2]) and not torch.equal(g, editor.vqgan.encoded[0])
    assert torch.equal(out, editor.edit(image, mask, "a small bird", gray_guidance=True, seed=3))
    _, a = editor.edit_tokens(image, mask, "a small bird", gray_guidance=True, seed=3)
    _, b = editor.edit_tokens(image, mask, "a small bird", gray_guidance=False, seed=3)
    assert not torch.equal(a, b)  # the grayscale tokens condition the samples


def test_edit_bad_inputs(editor):
    image = _images(1)[0]
    with pytest.raises(ValueError, match="grid"):
        editor.edit(image, torch.ones(8, 8, dtype=torch.bool), "a bird")
    with pytest.raises(ValueError, match="bool"):
        editor.edit(image, torch.ones(4, 4), "a bird")
    with pytest.raises(ValueError, match="texts"):
        editor.edit(_images(2), torch.ones(4, 4, dtype=torch.bool), ["a", "b", "c"])
    with pytest.raises(ValueError, match="context_length"):
        TransTokenEditor(editor.gpt, editor.vqgan, TextTokenizer(context_length=32))


def test_edit_with_a_tiny_real_vqgan():
    """The agreed VQGANModule interface end to end (64 px, f16 -> 4x4 tokens, 64 codes)."""
    from semani.models.vqgan import VQGANModule

    torch.manual_seed(0)
    ddconfig = {
        "double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0,
    }  # fmt: skip
    vqgan = VQGANModule(ddconfig, n_embed=64, embed_dim=8).eval().requires_grad_(False)
    gpt = SemaniGPT(GPTConfig.tiny(image_vocab_size=vqgan.n_embed)).eval()
    editor = TransTokenEditor(gpt, vqgan, TextTokenizer(context_length=16), filter_thres=0.5)
    images = _images(2)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    orig, edited = editor.edit_tokens(images, mask, "a bird", gray_guidance=True, seed=0)
    assert torch.equal(orig, vqgan.encode_to_tokens(images))
    assert torch.equal(edited[:, ~mask], orig[:, ~mask])
    out = editor.edit(images, mask, "a bird", gray_guidance=True, seed=0)
    assert out.shape == images.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, vqgan.decode_tokens(edited))
