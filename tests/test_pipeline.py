"""`semani.EntityEditPipeline`: the same edits as the written-out method (align every word on
the input, then edit in order), every input form, the editor and segmenter contracts, errors."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semani.alignment import EntityAligner, EntityNotFoundError, MaskedCropClipScorer
from semani.alignment.segmenters import SEGMENTERS, GroundTruthSegmenter, build_segmenter
from semani.data.transforms import image_to_tensor
from semani.manipulation.diff_editor import DiffEditor
from semani.manipulation.editor import Editor
from semani.modules.clip import TINY_CLIP_NAME
from semani.pipeline import EditResult, EntityEditPipeline, plan_edits
from tests.conftest import compose

H, W = 45, 70  # non-square, off the VAE grid
TEXT = "circle: a red circle | square: a blue square"


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_segmenters import tiny_mask2former

    return tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny")


@pytest.fixture(scope="module")
def parts(inpaint_folder: Path, m2f_dir: Path) -> tuple[EntityAligner, DiffEditor]:
    torch.manual_seed(0)
    segmenter = build_segmenter(
        "mask2former", model_name_or_path=str(m2f_dir), threshold=0.1,
        overlap_mask_area_threshold=0.0,
    )  # fmt: skip
    aligner = EntityAligner(MaskedCropClipScorer(TINY_CLIP_NAME, pretrained=None), segmenter)
    editor = DiffEditor.from_pretrained(inpaint_folder, steps=2, guidance_scale=1.0)
    return aligner, editor


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def test_the_pipeline_is_the_written_out_method(parts, photo) -> None:
    """Align every word on the input first, then edit in the text's order, each edit starting
    from the previous result with the same seed: bit for bit."""
    aligner, editor = parts
    result = EntityEditPipeline(aligner, editor)(photo, TEXT, seed=3)

    found = aligner.align_many(image_to_tensor(photo), TEXT, token_grid=None)
    running = photo
    for e in found:
        running = editor.edit(running, e.result.mask.numpy(), e.text, seed=3)[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(running))
    assert [(s.word, s.text) for s in result.edits] == [(e.word, e.text) for e in found]
    for step, e in zip(result.edits, found):
        assert np.array_equal(step.mask, e.result.mask.numpy())
        assert step.alignment.chosen == e.result.chosen
        assert torch.equal(step.alignment.similarities, e.result.similarities)
    union = found[0].result.mask.numpy() | found[1].result.mask.numpy()
    assert np.array_equal(result.mask, union)
    outside = np.asarray(result.image)[~union]
    assert np.array_equal(outside, np.asarray(photo)[~union])  # every outside pixel kept
    assert torch.equal(result.proposals.masks, found[0].result.proposals.masks)


def test_a_given_mask_skips_the_alignment(parts, photo) -> None:
    _, editor = parts
    mask = np.zeros((H, W), bool)
    mask[10:30, 20:50] = True
    pipe = EntityEditPipeline(None, editor)
    result = pipe(photo, "a red circle", mask=mask, seed=0)
    direct = editor.edit(photo, mask, "a red circle", seed=0)[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(direct))
    assert result.edits[0].word is None and result.edits[0].alignment is None
    assert result.proposals is None
    assert result.edits[0].report() == {"word": None, "text": "a red circle", "chosen": [],
                                        "similarities": []}  # fmt: skip
    white = Image.fromarray(mask.astype(np.uint8) * 255)  # any mask form: a white PIL image
    again = pipe(photo, "a red circle", mask=white, seed=0)
    assert np.array_equal(np.asarray(again.image), np.asarray(direct))


def test_every_input_form_gives_the_same_edit(parts, photo) -> None:
    pipe = EntityEditPipeline(*parts)
    arr = np.array(photo)
    forms = [photo, arr, torch.from_numpy(arr).permute(2, 0, 1),
             image_to_tensor(photo)]  # fmt: skip
    results = [pipe(x, "a red circle", entity="circle", seed=1) for x in forms]
    for r in results[1:]:
        assert np.array_equal(np.asarray(r.image), np.asarray(results[0].image))
        assert np.array_equal(r.mask, results[0].mask)
    assert all(r.image.mode == "RGB" and r.image.size == (W, H) for r in results)


def test_edit_result_views(parts, photo) -> None:
    result: EditResult = EntityEditPipeline(*parts)(photo, "a red circle", entity="circle")
    mask = result.mask
    assert np.array_equal(np.asarray(result.mask_image()) > 0, mask)
    over = np.asarray(result.overlay())
    assert np.array_equal(over[~mask], np.asarray(photo)[~mask])
    assert not np.array_equal(over[mask], np.asarray(photo)[mask])
    lines = result.edits[0].describe()
    assert lines[0].startswith("entity 'circle' -> 'a red circle':")
    assert sum("<- chosen" in line for line in lines) == len(result.edits[0].alignment.chosen)


def test_errors(parts, photo) -> None:
    aligner, editor = parts
    with pytest.raises(ValueError, match="no aligner"):
        EntityEditPipeline(None, editor)(photo, "a red circle", entity="circle")
    pipe = EntityEditPipeline(aligner, editor)
    with pytest.raises(ValueError, match=r"mask is \(3, 4\) but the image is \(45, 70\)"):
        pipe(photo, "a red circle", mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="no white pixel"):
        pipe(photo, "a red circle", mask=np.zeros((H, W), bool))
    with pytest.raises(ValueError, match="text is empty"):
        pipe(photo, "  ", entity="circle")
    with pytest.raises(ValueError, match="which entity"):
        pipe(photo, "a red circle")
    with pytest.raises(TypeError, match="is not an editor"):
        EntityEditPipeline(aligner, object())
    strict = EntityAligner(aligner.scorer, aligner.segmenter, selection="threshold",
                           threshold=1.01, threshold_mode="strict")  # fmt: skip
    with pytest.raises(EntityNotFoundError) as err:
        EntityEditPipeline(strict, editor)(photo, "a zebra", entity="zebra")
    assert err.value.word == "zebra" and len(err.value.proposals) == len(err.value.ranking) > 0


def test_the_editors_token_grid_reaches_the_aligner(parts, photo) -> None:
    """A token-level editor's grid makes proposals too small for it ineligible."""
    aligner, editor = parts

    class GridEditor:
        token_grid, min_tokens = (2, 2), 1

        def __init__(self) -> None:
            self.calls = 0

        def edit(self, image, mask, text, seed=None):
            self.calls += 1
            return [image]

    coarse = EntityAligner(aligner.scorer, aligner.segmenter, min_tokens=5)  # > 2x2 cells
    with pytest.raises(EntityNotFoundError, match=r"fewer than 5 cells of the \(2, 2\)"):
        EntityEditPipeline(coarse, GridEditor())(photo, "a red circle", entity="circle")
    grid_editor = GridEditor()
    fine = EntityAligner(aligner.scorer, aligner.segmenter, min_tokens=1)
    result = EntityEditPipeline(fine, grid_editor)(photo, "a red circle", entity="circle")
    assert grid_editor.calls == 1 and result.edits[0].alignment.token_mask.shape == (2, 2)


def test_from_config_builds_the_configured_pipeline(inpaint_folder: Path, m2f_dir: Path) -> None:
    cfg = compose(
        "manipulate",
        [f"editor.source={inpaint_folder}", "alignment/segmenter=mask2former",
         f"alignment.segmenter.model_name_or_path={m2f_dir}",
         "alignment/scorer=masked_crop_clip", f"alignment.scorer.model_name={TINY_CLIP_NAME}",
         "alignment.scorer.pretrained=null", "alignment.max_proposals=3", "image=x", "text=y"],
    )  # fmt: skip
    pipe = EntityEditPipeline.from_config(cfg)
    assert isinstance(pipe.editor, DiffEditor) and isinstance(pipe.aligner, EntityAligner)
    assert pipe.aligner.max_proposals == 3 and pipe.aligner.selection == "argmax"
    assert type(pipe.aligner.segmenter).__name__ == "Mask2FormerSegmenter"
    assert pipe.sampler_options == ("steps", "guidance_scale")
    assert EntityEditPipeline.from_config(cfg, align=False).aligner is None


def test_plan_edits() -> None:
    assert plan_edits("a blue bird", "bird", False) == [("bird", "a blue bird")]
    assert plan_edits(TEXT, None, False) == [("circle", "a red circle"),
                                             ("square", "a blue square")]  # fmt: skip
    assert plan_edits("a sky: blue", "sky", True) == [(None, "a sky: blue")]


# -- the contracts ------------------------------------------------------------------------------
def test_every_editor_honours_the_editor_contract(
    parts, inpaint_folder: Path, text2image_folder: Path
) -> None:
    from semani.manipulation.blended import BlendedLatentEditor
    from semani.manipulation.trans import TransEditor
    from tests.test_semani_trans_module import make_module

    editors = [
        parts[1],
        BlendedLatentEditor.from_pretrained(text2image_folder),
        TransEditor(make_module(clip=None, lambda_sem=0.0).eval()),
    ]
    for editor in editors:
        assert isinstance(editor, Editor), type(editor).__name__
        params = list(inspect.signature(editor.edit).parameters)
        assert params[:3] == ["image", "mask", "text"] and "seed" in params
    assert editors[0].token_grid is None and editors[1].token_grid is None
    assert editors[2].token_grid == (8, 8)


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_every_segmenter_honours_the_segmenter_contract(name: str) -> None:
    """`segment(image, sample=None)` on every segmenter class, so that no caller checks which
    segmenter it has."""
    from semani.alignment import segmenters

    cls = getattr(segmenters, SEGMENTERS[name].rsplit(".", 1)[1])
    params = inspect.signature(cls.segment).parameters
    assert list(params)[:3] == ["self", "image", "sample"] and params["sample"].default is None


def test_the_ground_truth_segmenter_reads_the_sample(shapes_root: Path) -> None:
    from semani.data.shapes import ShapesWorldDataset

    sample = ShapesWorldDataset(shapes_root, "test", image_size=64, context_length=40)[0]
    props = GroundTruthSegmenter().segment(sample["image"], sample)
    assert props.names == list(sample["entity_names"])


def test_semani_trans_chains_several_entities_on_its_tokens(photo) -> None:
    """Two entities, as the authors edit them: the second is re-sampled on the first edit's
    tokens (not on a re-encoding of its decoded image), one decode, one paste."""
    from semani.manipulation.pixels import composite, feather_weights, prepare_inputs
    from semani.manipulation.trans import TransEditor
    from semani.utils.masks import mask_to_token_mask
    from tests.test_semani_trans_module import make_module

    editor = TransEditor(make_module(clip=None, lambda_sem=0.0).eval(), filter_thres=0.5)
    a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[5:25, 5:30], b[20:40, 35:65] = True, True
    got = editor.edit_many(photo, [a, b], ["a red circle", "a blue square"], seed=4)[0]

    src, _, pixels, _ = prepare_inputs(photo, a, factor=1)
    x = torch.nn.functional.interpolate(
        pixels, size=editor.image_size, mode="bilinear", antialias=True
    ).clamp(-1, 1)[0]
    tokens = None
    for m, text in ((a, "a red circle"), (b, "a blue square")):
        tm = mask_to_token_mask(torch.from_numpy(m).float(), editor.token_grid, min_tokens=1)
        _, tokens = editor.tokens.edit_tokens(x, tm, text, True, 4, tokens=tokens)
    out = ((editor.tokens.vqgan.decode_tokens(tokens)[0] + 1) / 2).clamp(0, 1)[None]
    out = torch.nn.functional.interpolate(out, size=(H, W), mode="bilinear", antialias=True)
    want = composite(src, out.clamp(0, 1), feather_weights(torch.from_numpy(a | b), 4))[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    outside = ~(a | b)
    assert np.array_equal(np.asarray(got)[outside], np.asarray(photo)[outside])

    calls = []
    editor.edit_many = lambda *args, **kw: calls.append(args) or [photo]
    EntityEditPipeline(None, editor)(photo, "x", mask=a)  # one edit: edit()
    assert not calls


@pytest.mark.parametrize("which", ["diff", "blended", "trans"])
def test_ten_successive_edits_do_not_drift(
    which: str, parts, photo, text2image_folder: Path
) -> None:
    """Ten edits of one photo, each on the previous result with its own mask: every pixel
    outside the union of the masks is still the original's, bit for bit (no re-encoding of the
    whole image creeps in), and each edit changed its own mask's inside."""
    from semani.manipulation.blended import BlendedLatentEditor
    from semani.manipulation.trans import TransEditor
    from tests.test_semani_trans_module import make_module

    editor = {
        "diff": lambda: parts[1],
        "blended": lambda: BlendedLatentEditor.from_pretrained(
            text2image_folder, steps=2, composite=True
        ),
        "trans": lambda: TransEditor(make_module(clip=None, lambda_sem=0.0).eval()),
    }[which]()
    pipe = EntityEditPipeline(None, editor)
    original = np.asarray(photo)
    rng = np.random.default_rng(1)
    running, union = photo, np.zeros((H, W), bool)
    for k in range(10):
        y, x = rng.integers(0, H - 12), rng.integers(0, W - 12)
        mask = np.zeros((H, W), bool)
        mask[y : y + 12, x : x + 12] = True
        before = np.asarray(running)
        running = pipe(running, f"a shape number {k}", mask=mask, seed=k).image
        after = np.asarray(running)
        assert np.array_equal(after[~mask], before[~mask]), f"edit {k} changed outside its mask"
        assert not np.array_equal(after[mask], before[mask]), f"edit {k} changed nothing"
        union |= mask
    assert np.array_equal(np.asarray(running)[~union], original[~union])
    assert union.mean() < 0.9  # something stayed outside
