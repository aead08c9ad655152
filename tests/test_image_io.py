"""read_image / read_mask: RGBA, greyscale, 16-bit, palette and EXIF-rotated files, bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semani.utils.image_io import ImageReadError, read_image, read_mask

H, W = 6, 10  # non-square


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _png16(path: Path, a: np.ndarray) -> Path:
    """A 16-bit PNG of (H, W, C) uint16 (C = 1, 2, 3, 4), written by hand (Pillow cannot)."""
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


def _check(im: Image.Image, expected: np.ndarray, atol: int = 0) -> None:
    assert im.mode == "RGB" and im.size == (expected.shape[1], expected.shape[0])
    got = np.asarray(im).astype(int)
    np.testing.assert_allclose(got, expected.astype(int), atol=atol, rtol=0)


def test_rgb_png_and_jpeg_read_as_is(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    _check(read_image(tmp_path / "a.png"), a)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=100, subsampling=0)
    _check(read_image(tmp_path / "a.jpg"), a, atol=8)  # JPEG loss


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    a = _rgb()
    alpha = np.zeros((H, W), np.uint8)
    alpha[:, : W // 2] = 255  # left opaque, right transparent
    alpha[0, -1] = 128  # one half-transparent pixel
    Image.fromarray(np.dstack([a, alpha]), "RGBA").save(tmp_path / "a.png")
    expected = a.copy()
    expected[:, W // 2 :] = 255
    expected[0, -1] = np.round(a[0, -1].astype(float) * 128 / 255 + 255 * 127 / 255)
    _check(read_image(tmp_path / "a.png"), expected, atol=1)


def test_greyscale_and_la(tmp_path: Path) -> None:
    g = _rgb()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    _check(read_image(tmp_path / "g.png"), np.repeat(g[..., None], 3, -1))
    la = np.dstack([g, np.full_like(g, 255)])
    la[1, 1, 1] = 0  # one transparent pixel
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    expected = np.repeat(g[..., None], 3, -1)
    expected[1, 1] = 255
    _check(read_image(tmp_path / "la.png"), expected)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    g8 = _rgb()[..., 0]
    g16 = g8.astype(np.uint16) * 257  # 255 -> 65535
    Image.fromarray(g16).save(tmp_path / "g16.png")  # Pillow writes I;16 as a 16-bit PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    _check(read_image(tmp_path / "g16.png"), np.repeat(g8[..., None], 3, -1))
    _png16(tmp_path / "g16b.png", g16[..., None])  # big-endian, written by hand
    _check(read_image(tmp_path / "g16b.png"), np.repeat(g8[..., None], 3, -1))


def test_16_bit_colour_png(tmp_path: Path) -> None:
    a8 = _rgb()
    a16 = a8.astype(np.uint16) * 257
    _check(read_image(_png16(tmp_path / "rgb16.png", a16)), a8, atol=1)
    alpha = np.full((H, W, 1), 65535, np.uint16)
    alpha[0, 0] = 0
    expected = a8.copy()
    expected[0, 0] = 255
    rgba16 = _png16(tmp_path / "rgba16.png", np.concatenate([a16, alpha], -1))
    _check(read_image(rgba16), expected, atol=1)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    palette = [255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9)
    idx = np.zeros((H, W), np.uint8)
    idx[:, 3:] = 1
    idx[:, 7:] = 2
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png", transparency=2)  # index 2 (green) is transparent
    expected = np.zeros((H, W, 3), np.uint8)
    expected[:, :3] = (255, 0, 0)
    expected[:, 3:7] = (0, 0, 255)
    expected[:, 7:] = 255  # transparent -> white, not green
    _check(read_image(tmp_path / "p.png"), expected)
    im.save(tmp_path / "p_opaque.png")
    expected[:, 7:] = (0, 255, 0)
    _check(read_image(tmp_path / "p_opaque.png"), expected)


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270),
                                                   (8, Image.Transpose.ROTATE_90),
                                                   (3, Image.Transpose.ROTATE_180)])  # fmt: skip
def test_exif_rotated_jpeg_comes_out_upright(
    tmp_path: Path, orientation: int, transpose: Image.Transpose
) -> None:
    stored = np.zeros((H, W, 3), np.uint8)  # as stored: a red left half, a blue right half
    stored[:, : W // 2] = (255, 0, 0)
    stored[:, W // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    upright = np.asarray(Image.fromarray(stored).transpose(transpose))
    im = read_image(tmp_path / "r.jpg")
    _check(im, upright, atol=60)  # JPEG ringing at the colour edge
    assert im.getexif().get(0x0112, 1) == 1  # the tag is not applied twice downstream
    if orientation in (6, 8):
        assert im.size == (H, W)  # (width, height) swapped


def test_read_mask_white_is_edit_any_size_and_alpha_is_black(tmp_path: Path) -> None:
    m = np.zeros((3, 5), np.uint8)
    m[1, 1:4] = 255
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    small = read_mask(tmp_path / "m.png")
    assert small.dtype == bool and small.tolist() == (m == 255).tolist()
    big = read_mask(tmp_path / "m.png", (6, 10))  # nearest: each cell becomes 2x2
    assert np.array_equal(big, np.kron(m == 255, np.ones((2, 2), bool)))
    strokes = np.zeros((3, 5, 4), np.uint8)  # white strokes on a transparent layer
    strokes[..., :3] = 255
    strokes[1, 1:4, 3] = 255
    Image.fromarray(strokes, "RGBA").save(tmp_path / "s.png")
    assert read_mask(tmp_path / "s.png").tolist() == (m == 255).tolist()


def test_unreadable_files_raise_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="cannot read image .*junk.png"):
        read_image(tmp_path / "junk.png")
    Image.fromarray(_rgb()).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(OSError, match="cannot read image"):
        read_mask(tmp_path / "t.png")
