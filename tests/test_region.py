"""`editor.region=entity`: the context window (`context_box`), the crop-edit-paste of every
input form (`edit_in_region`), and the three editors with it: the whole-image default unchanged,
every pixel outside the mask kept, the same as editing the crop by hand and pasting it."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from semani.manipulation.blended import BlendedLatentEditor
from semani.manipulation.diff_editor import DiffEditor, pretrained_parts
from semani.manipulation.pixels import (
    as_source,
    composite,
    feather_weights,
    prepare_inputs,
    resize_bilinear,
    to_kind,
)
from semani.manipulation.region import context_box, crop_image, edit_in_region
from semani.manipulation.trans import TransEditor, mask_to_token_mask
from tests.conftest import CONFIG_DIR, REPO_ROOT
from tests.test_semani_trans_module import make_module

TEXT = "a red circle"
KINDS = ["pil", "numpy", "uint8", "float"]


def image_and_mask(h: int, w: int, box: tuple[int, int, int, int], seed: int = 0):
    """A random (h, w, 3) uint8 image and a bool mask: a disc inscribed in `box` (y0, y1, x0,
    x1), so that the mask is not its own bounding box."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx, ry, rx = (y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return image, mask


def as_kind(image: np.ndarray, kind: str) -> Any:
    """An (H, W, 3) uint8 image in one of the editors' input forms."""
    return {
        "pil": lambda: Image.fromarray(image),
        "numpy": lambda: image,
        "uint8": lambda: torch.from_numpy(image).permute(2, 0, 1),
        "float": lambda: torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
    }[kind]()


def as_array(out: Any, kind: str) -> np.ndarray:
    """An editor's output (N images of `kind`) -> (N, H, W, 3) uint8 (float: [-1, 1] -> 0..255
    exactly for the inputs of `as_kind`, elsewhere rounded)."""
    if kind == "pil":
        return np.stack([np.asarray(o) for o in out])
    if kind == "numpy":
        return np.asarray(out)
    if kind == "float":
        out = ((out.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy()


def paste(image: np.ndarray, box: tuple[int, int, int, int], crop: np.ndarray) -> np.ndarray:
    y0, y1, x0, x1 = box
    out = image.copy()
    out[y0:y1, x0:x1] = crop
    return out


# ---------------------------------------------------------------------------------------------
# the window


def test_context_box_grows_the_box_into_a_square() -> None:
    mask = np.zeros((100, 100), bool)
    mask[40:50, 40:60] = True  # 10 x 20
    assert context_box(mask, 0.5) == (25, 65, 30, 70)  # 20 * (1 + 2 * 0.5) = 40, centred
    assert context_box(mask, 0.0) == (35, 55, 40, 60)  # the box's longer side, square
    assert context_box(torch.from_numpy(mask).float(), 0.5) == (25, 65, 30, 70)
    assert context_box(mask, 0.25, min_side=50) == (20, 70, 25, 75)  # 30 -> at least 50
    dot = np.zeros((100, 100), bool)
    dot[7, 90] = True
    assert context_box(dot, 0.5) == (6, 8, 89, 91)  # ceil(1 * 2) = 2 px, floor-centred


def test_context_box_shifts_inside_the_image_and_clips_to_it() -> None:
    corner = np.zeros((100, 100), bool)
    corner[0:10, 95:100] = True
    assert context_box(corner, 0.5) == (0, 20, 80, 100)  # shifted in, still square
    wide = np.zeros((30, 200), bool)
    wide[5:25, 90:110] = True
    assert context_box(wide, 1.0) == (0, 30, 70, 130)  # 60 px: clipped to the 30 px height
    assert context_box(wide, 10.0) == (0, 30, 0, 200)  # larger than the image: the image


def test_context_box_of_an_empty_or_full_mask_is_the_image() -> None:
    assert context_box(np.zeros((45, 70), bool), 0.5) == (0, 45, 0, 70)
    assert context_box(np.ones((45, 70), bool), 0.0) == (0, 45, 0, 70)
    with pytest.raises(ValueError, match=r"mask must be \(H, W\)"):
        context_box(np.zeros((1, 45, 70), bool), 0.5)


def test_context_box_always_holds_the_mask() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(8, 120, 2)
        mask = np.zeros((h, w), bool)
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y : y + rng.integers(1, h), x : x + rng.integers(1, w)] = True
        margin = float(rng.uniform(0, 2))
        y0, y1, x0, x1 = context_box(mask, margin)
        ys, xs = np.nonzero(mask)
        assert 0 <= y0 <= ys.min() and ys.max() < y1 <= h
        assert 0 <= x0 <= xs.min() and xs.max() < x1 <= w
        side = max(np.ptp(ys), np.ptp(xs)) + 1
        want = int(np.ceil(side * (1 + 2 * margin)))
        assert (y1 - y0, x1 - x0) == (min(want, h), min(want, w))


# ---------------------------------------------------------------------------------------------
# crop, edit, paste


def paint_mask(image: Any, masks: list[Any]) -> Any:
    """A stand-in editor: the pixels inside the masks white, one output, the input's form."""
    src = as_source(image)
    m = torch.stack([torch.as_tensor(np.asarray(x)).float() for x in masks]).amax(0) >= 0.5
    out = src.original.clone()
    out[:, m] = 255 if src.kind != "float" else torch.tensor(1.0, dtype=out.dtype)
    return to_kind(out[None], src.kind)


@pytest.mark.parametrize("kind", KINDS)
def test_edit_in_region_pastes_the_crop_in_every_form(kind: str) -> None:
    image, mask = image_and_mask(300, 500, (200, 216, 40, 60))
    given = as_kind(image, kind)
    seen = []
    edit = lambda crop, masks: seen.append((crop, masks)) or paint_mask(crop, masks)
    out = edit_in_region("entity", 0.5, given, [mask], edit)
    crop, masks = seen[0]
    assert as_source(crop).original.shape == (3, 40, 40)  # the disc's 20 px box, doubled
    assert masks[0].shape == (40, 40) and masks[0].dtype == torch.float32
    assert type(out) is type(paint_mask(given, [mask]))
    if kind in ("uint8", "float"):
        assert out.dtype == given.dtype and out.shape == (1, 3, 300, 500)
    assert np.array_equal(as_array(out, kind), as_array(paint_mask(given, [mask]), kind))
    whole = edit_in_region("image", 0.5, given, [mask], edit)  # the whole image, as given
    assert seen[-1][0] is given and np.array_equal(as_array(whole, kind), as_array(out, kind))


def test_edit_in_region_crops_around_the_union_of_the_masks() -> None:
    image, a = image_and_mask(120, 200, (10, 20, 10, 30))
    _, b = image_and_mask(120, 200, (60, 80, 150, 170))
    seen = []
    edit = lambda crop, masks: seen.append(np.asarray(crop)) or paint_mask(crop, masks)
    out = edit_in_region("entity", 0.0, image, [a, b], edit)
    assert seen[0].shape == (120, 160, 3)  # rows 10..80 grow to 160 (clipped to 120)
    assert np.array_equal(seen[0], image[:, 10:170])
    assert np.array_equal(out[0], np.asarray(paint_mask(image, [a, b]))[0])


# ---------------------------------------------------------------------------------------------
# the editors


@pytest.fixture(scope="module")
def diff_parts(inpaint_folder: Path) -> dict[str, Any]:
    return pretrained_parts(inpaint_folder, True, "DDIMScheduler", None, None)


@pytest.fixture(scope="module")
def blended_parts(text2image_folder: Path) -> dict[str, Any]:
    return pretrained_parts(text2image_folder, False, "DDIMScheduler", None, None)


@pytest.fixture(scope="module")
def trans_model():
    return make_module(clip=None, lambda_sem=0.0).eval()


def make_editor(which: str, parts: dict[str, Any], **kw: Any):
    """The editor `which` ("diff", "blended", "trans") with a 32 px model grid (the tiny
    diffusion models: 4x4 latents) or SeMani-Trans's 64 px."""
    if which == "trans":
        return TransEditor(parts["trans"], filter_thres=0.5, **kw)
    if which == "diff":
        return DiffEditor(**parts["diff"], steps=2, side=32, feather=2, **kw)
    return BlendedLatentEditor(**parts["blended"], steps=2, side=32, composite=True, **kw)


@pytest.fixture(scope="module")
def parts(diff_parts, blended_parts, trans_model) -> dict[str, Any]:
    return {"diff": diff_parts, "blended": blended_parts, "trans": trans_model}


@pytest.mark.parametrize("which", ["diff", "blended", "trans"])
def test_the_constructors_check_region_and_context(which: str, parts) -> None:
    for bad, match in [
        ({"region": "crop"}, "region must be one of"),
        ({"context": -0.1}, "context must be a finite number >= 0"),
        ({"context": float("nan")}, "context must be a finite number >= 0"),
        ({"context": "0.5"}, "context must be a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_editor(which, parts, **bad)
    editor = make_editor(which, parts, region="entity", context=1)
    assert (editor.region, editor.context) == ("entity", 1.0)


def test_region_image_is_the_whole_image_edit_as_before(parts) -> None:
    """region=image (the default) is the edit written out: the whole image on the model grid,
    decoded, resized back, composited."""
    image, mask = image_and_mask(300, 500, (200, 230, 40, 70))
    editor = make_editor("diff", parts, region="image")
    got = editor.edit(image, mask, TEXT, seed=3)
    src, pixel_mask, pixels, grid_mask = prepare_inputs(image, mask, editor.factor, 32)
    assert pixels.shape[-2:] == (16, 32)  # the whole photo at the model's size
    generator = torch.Generator().manual_seed(3)
    latents = editor.generate_latents(pixels, grid_mask, TEXT, generator=generator)
    decoded = resize_bilinear(editor.decode(latents), (300, 500)).clamp(0, 1)
    want = composite(src, decoded, feather_weights(pixel_mask[0, 0], 2))
    assert np.array_equal(got, want)
    assert np.array_equal(make_editor("diff", parts).edit(image, mask, TEXT, seed=3), want)
    entity = make_editor("diff", parts, region="entity").edit(image, mask, TEXT, seed=3)
    assert not np.array_equal(entity, want)  # the window differs from the whole image


def test_trans_region_image_is_the_whole_image_edit_as_before(parts) -> None:
    image, mask = image_and_mask(45, 70, (10, 30, 20, 44))
    editor = make_editor("trans", parts)
    got = editor.edit(image, mask, TEXT, seed=2)
    src, pixel_mask, pixels, _ = prepare_inputs(image, mask, factor=1)
    x = resize_bilinear(pixels, editor.image_size).clamp(-1, 1)[0]  # (3, 64, 64)
    token_mask = mask_to_token_mask(pixel_mask[0, 0], editor.token_grid, min_tokens=1)
    out = editor.tokens.edit(x, token_mask, TEXT, True, 2)  # (3, 64, 64)
    decoded = resize_bilinear(((out + 1) / 2).clamp(0, 1)[None], (45, 70)).clamp(0, 1)
    want = composite(src, decoded, feather_weights(pixel_mask[0, 0], 4))
    assert np.array_equal(got, want)


@pytest.mark.parametrize("which", ["diff", "blended", "trans"])
@pytest.mark.parametrize(
    "size, box", [((45, 70), (10, 30, 20, 44)), ((300, 500), (200, 216, 40, 60))]
)
def test_region_entity_keeps_size_form_and_outside_pixels(which, size, box, parts) -> None:
    image, mask = image_and_mask(*size, box, seed=1)
    editor = make_editor(which, parts, region="entity")
    for kind in KINDS if which == "diff" else ["numpy"]:
        given = as_kind(image, kind)
        out = editor.edit(given, torch.from_numpy(mask), TEXT, seed=0)
        if kind == "pil":
            assert isinstance(out, list) and out[0].size == (size[1], size[0])
        if kind in ("uint8", "float"):
            assert out.shape == (1, 3, *size) and out.dtype == given.dtype
        got = as_array(out, kind)
        assert got.shape == (1, *size, 3)
        assert np.array_equal(got[0][~mask], image[~mask]), kind
        assert not np.array_equal(got[0][mask], image[mask]), kind


def test_a_full_mask_edits_the_whole_image(parts) -> None:
    image, _ = image_and_mask(45, 70, (0, 1, 0, 1))
    full = np.ones((45, 70), bool)
    whole = make_editor("diff", parts).edit(image, full, TEXT, seed=0)
    entity = make_editor("diff", parts, region="entity").edit(image, full, TEXT, seed=0)
    assert np.array_equal(entity, whole)


@pytest.mark.parametrize("which", ["diff", "blended", "trans"])
def test_region_entity_is_the_crop_edited_and_pasted(which: str, parts) -> None:
    """Bit for bit: region=entity = the region=image editor on the crop, pasted by hand."""
    image, mask = image_and_mask(300, 500, (200, 230, 40, 70), seed=2)
    box = context_box(mask, 0.5)
    y0, y1, x0, x1 = box
    assert (y1 - y0, x1 - x0) == (60, 60)
    crop = make_editor(which, parts).edit(image[y0:y1, x0:x1], mask[y0:y1, x0:x1], TEXT, seed=5)
    want = paste(image, box, crop[0])
    got = make_editor(which, parts, region="entity").edit(image, mask, TEXT, seed=5)
    assert np.array_equal(got[0], want)
    pil = make_editor(which, parts, region="entity").edit(
        Image.fromarray(image), mask, TEXT, seed=5
    )
    assert np.array_equal(np.asarray(pil[0]), want)


def test_diff_region_entity_passes_the_sampler_options(parts) -> None:
    image, mask = image_and_mask(300, 500, (20, 40, 400, 430), seed=3)
    box = context_box(mask, 0.25)
    kw = dict(seed=1, steps=3, guidance_scale=3.0, num_images=2, feather=0, strength=0.7)
    crop = make_editor("diff", parts).edit(
        crop_image(image, box), crop_image(mask, box), TEXT, **kw
    )
    got = make_editor("diff", parts, region="entity", context=0.25).edit(image, mask, TEXT, **kw)
    assert got.shape == (2, 300, 500, 3)
    for k in range(2):
        assert np.array_equal(got[k], paste(image, box, crop[k]))


def test_trans_edit_many_crops_around_the_union(parts) -> None:
    image, a = image_and_mask(300, 500, (40, 60, 40, 60), seed=4)
    _, b = image_and_mask(300, 500, (80, 100, 100, 124), seed=4)
    texts = ["a red circle", "a blue square"]
    box = context_box(a | b, 0.5)
    assert box == (0, 168, 0, 168)  # the union's 60 x 84 box: a 168 px square, shifted in
    crops = [crop_image(m, box) for m in (a, b)]
    want = make_editor("trans", parts).edit_many(crop_image(image, box), crops, texts, seed=1)
    got = make_editor("trans", parts, region="entity").edit_many(image, [a, b], texts, seed=1)
    assert np.array_equal(got[0], paste(image, box, want[0]))
    outside = ~(a | b)
    assert np.array_equal(got[0][outside], image[outside])


def test_blended_without_composite_changes_only_the_window(parts) -> None:
    image, mask = image_and_mask(300, 500, (200, 230, 40, 70))
    editor = BlendedLatentEditor(**parts["blended"], steps=2, side=32, region="entity")
    y0, y1, x0, x1 = context_box(mask, 0.5)
    out = editor.edit(image, mask, TEXT, seed=0)[0]
    window = np.zeros(mask.shape, bool)
    window[y0:y1, x0:x1] = True
    assert np.array_equal(out[~window], image[~window])
    assert not np.array_equal(out[window & ~mask], image[window & ~mask])  # the VAE's pixels


# ---------------------------------------------------------------------------------------------
# configs and the measurement script


@pytest.mark.parametrize("name", ["semani_diff", "blended_ldm", "semani_trans"])
def test_the_editor_configs_default_to_the_whole_image(name: str) -> None:
    cfg = OmegaConf.load(CONFIG_DIR / "editor" / f"{name}.yaml")
    assert cfg.region == "image" and cfg.context == 0.5
    _, cls, _ = cfg._target_.rsplit(".", 2)  # <module>.<class>.<factory>
    target = {"DiffEditor": DiffEditor, "BlendedLatentEditor": BlendedLatentEditor,
              "TransEditor": TransEditor}[cls]  # fmt: skip
    params = inspect.signature(target.__init__).parameters
    assert params["region"].default == "image" and "context" in params


def test_manipulate_config_sets_the_region(inpaint_folder: Path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose

    over = [f"editor.source={inpaint_folder}", "editor.region=entity", "editor.context=0.25"]
    editor = instantiate(compose("manipulate", over).editor)
    assert (editor.region, editor.context) == ("entity", 0.25)


def test_check_region_shapes_reports_both_regions(inpaint_folder: Path, shapes_root: Path) -> None:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from check_region_shapes import main
    finally:
        sys.path.pop(0)
    result = main(["--model", str(inpaint_folder), "--data", str(shapes_root), "--n", "3",
                   "--steps", "2", "--scale", "4", "--photo", "120", "160"])  # fmt: skip
    assert result["n"] == 3 and result["outside_changed"] == {"image": 0, "entity": 0}
    for region in ("image", "entity"):
        assert 0.0 <= result["colour_success"][region] <= 1.0
        assert set(result["success_by_size"][region]) <= {"small", "medium", "large"}
        assert result["photo"][region]["seconds_per_edit"] > 0
        assert result["photo"][region]["peak_rss_mb"] > 0
    assert sum(result["discordant"].values()) <= 3


def test_region_entity_aligns_a_small_entity_the_whole_image_grid_would_drop(parts) -> None:
    """A 16x20 px entity of a 300x500 photo covers under 4 cells of SeMani-Trans's 8x8 grid over
    the whole image (ineligible, as the authors skip such entities), but most of its window's:
    with region="entity" the alignment does not count whole-image cells and the entity is
    edited, every pixel outside its mask kept."""
    from semani.alignment import EntityAligner
    from semani.alignment.types import EntityNotFoundError, EntityProposals
    from semani.manipulation.region import alignment_grid
    from semani.pipeline import EntityEditPipeline

    class OneScorer:  # every proposal matches
        selection, threshold = "argmax", None

        def __call__(self, image, proposals, word):
            return torch.ones(len(proposals))

    image, mask = image_and_mask(300, 500, (200, 216, 40, 60), seed=2)
    proposals = EntityProposals(torch.from_numpy(mask)[None], torch.ones(1))
    aligner = EntityAligner(OneScorer(), min_tokens=4)
    whole = make_editor("trans", parts, min_tokens=4)
    assert alignment_grid(whole) == whole.token_grid == (8, 8)
    assert int(mask_to_token_mask(torch.from_numpy(mask), (8, 8), min_tokens=0).sum()) < 4
    with pytest.raises(EntityNotFoundError, match=r"fewer than 4 cells of the \(8, 8\)"):
        EntityEditPipeline(aligner, whole)(image, TEXT, entity="circle", proposals=proposals)
    window = make_editor("trans", parts, min_tokens=4, region="entity")
    assert alignment_grid(window) is None
    result = EntityEditPipeline(aligner, window)(
        image, TEXT, entity="circle", proposals=proposals, seed=0
    )
    edited = np.asarray(result.image)
    assert np.array_equal(result.mask, mask) and np.array_equal(edited[~mask], image[~mask])
    assert not np.array_equal(edited[mask], image[mask])
