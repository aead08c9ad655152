"""`python manipulate.py` on tiny random models: user masks, alignment, several edits,
SeMani-Trans, and the one-line errors (unreadable image, missing model, entity not found)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from semani.alignment.types import EntityNotFoundError
from semani.modules.clip import TINY_CLIP_NAME
from semani.pipeline import plan_edits
from semani.tasks.manipulate import main, manipulate
from semani.utils.image_io import read_image
from tests.conftest import REPO_ROOT, compose

H, W = 45, 70  # non-square and off the VAE grid (the model sees 40x64)


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random one-class Mask2Former that proposes segments on any image."""
    from tests.test_segmenters import tiny_mask2former

    return tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny")


@pytest.fixture(scope="module")
def trans_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SeMani-Trans checkpoint (64 px, 8x8 tokens) as `semani.load_model` reads."""
    from tests.test_semani_trans_module import make_module

    module = make_module(clip=None, lambda_sem=0.0)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("trans") / "tiny.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def rgba_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square RGBA PNG: random colours, a transparent band on the left."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, :6, 3] = 0
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 9x14 mask (a fifth of the image size): resized (nearest) to 45x70 it is rows 10..34,
    columns 20..49."""
    m = np.zeros((9, 14), np.uint8)
    m[2:7, 4:10] = 255
    path = tmp_path_factory.mktemp("masks") / "mask.png"
    Image.fromarray(m, "L").save(path)
    return path


def _expected_mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[10:35, 20:50] = True
    return m


def _cfg(tmp_path: Path, overrides: list[str]) -> Any:
    return compose("manipulate", [f"out={tmp_path / 'out'}", "seed=0", *overrides], tmp_path)


def _diff(folder: Path) -> list[str]:
    return ["method=semani_diff", f"editor.source={folder}", "editor.steps=2",
            "editor.guidance_scale=1.0", "editor.side=null"]  # fmt: skip


def _aligner(m2f: Path, extra: list[str] = (), mode: str | None = "keep_best") -> list[str]:
    """The tiny segmenter and scorer; random weights score at random, so the paper's argmax
    (`mode`) unless a test asks for another rule (None: manipulate.py's default, strict)."""
    mode = [f"alignment.threshold_mode={mode}"] if mode else []
    return [
        "alignment/segmenter=mask2former",
        f"alignment.segmenter.model_name_or_path={m2f}",
        "alignment.segmenter.threshold=0.1",
        "alignment.segmenter.overlap_mask_area_threshold=0",
        "alignment/scorer=masked_crop_clip",
        f"alignment.scorer.model_name={TINY_CLIP_NAME}",
        "alignment.scorer.pretrained=null",
        *mode,
        *extra,
    ]


def _outputs(out: Path) -> dict[str, np.ndarray]:
    assert sorted(p.name for p in out.iterdir()) == ["edited.png", "mask.png", "overlay.png"]
    return {p.stem: np.asarray(Image.open(p)) for p in out.iterdir()}  # no temporary files left


def _check_kept_outside(out: Path, image: Path, mask: np.ndarray) -> dict[str, np.ndarray]:
    got = _outputs(out)
    source = np.asarray(read_image(image))  # the RGBA input composited on white
    assert got["edited"].shape == (H, W, 3)  # the input's size
    assert np.array_equal(got["edited"][~mask], source[~mask])  # bit for bit
    assert not np.array_equal(got["edited"][mask], source[mask])
    assert np.array_equal(got["mask"], mask.astype(np.uint8) * 255)
    assert np.array_equal(got["overlay"][~mask], source[~mask])
    assert not np.array_equal(got["overlay"][mask], source[mask])
    return got


# -- the text -----------------------------------------------------------------------------------
def test_plan_edits() -> None:
    assert plan_edits("a blue bird", "bird", False) == [("bird", "a blue bird")]
    assert plan_edits("bird: a blue bird | branch: a snowy branch", None, False) == [
        ("bird", "a blue bird"), ("branch", "a snowy branch")]  # fmt: skip
    assert plan_edits("a sky: blue", None, True) == [(None, "a sky: blue")]  # mask: plain text
    with pytest.raises(ValueError, match="which entity"):
        plan_edits("a blue bird", None, False)
    with pytest.raises(ValueError, match="cannot parse"):
        plan_edits("bird: a blue bird | snowy", None, False)


# -- editing --------------------------------------------------------------------------------------
def test_diff_with_user_mask_keeps_every_outside_pixel(
    tmp_path: Path, inpaint_folder: Path, rgba_image: Path, mask_file: Path
) -> None:
    cfg = _cfg(tmp_path, _diff(inpaint_folder)
               + [f"image={rgba_image}", f"mask={mask_file}", "text=a red circle"])  # fmt: skip
    result = manipulate(cfg)
    assert result["edits"] == [{"word": None, "text": "a red circle", "chosen": [],
                                "similarities": []}]  # fmt: skip
    got = _check_kept_outside(tmp_path / "out", rgba_image, _expected_mask())
    assert (got["edited"][:, :6] == 255).all()  # the transparent band came in white and stayed


def test_several_edits_are_aligned_then_applied_in_order(
    tmp_path: Path,
    inpaint_folder: Path,
    m2f_dir: Path,
    rgba_image: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from semani.manipulation.diff_editor import DiffEditor

    calls: list[tuple[np.ndarray, str, np.ndarray]] = []  # (input, text, output) of each edit
    edit = DiffEditor.edit

    def spy(self, image, mask, text, **kwargs):
        out = edit(self, image, mask, text, **kwargs)
        calls.append((np.asarray(image).copy(), text, np.asarray(out[0]).copy()))
        return out

    monkeypatch.setattr(DiffEditor, "edit", spy)
    text = "text=circle: a red circle | square: a blue square"
    cfg = _cfg(tmp_path, _diff(inpaint_folder) + _aligner(m2f_dir) + [f"image={rgba_image}", text])
    with caplog.at_level(logging.INFO, logger="semani"):
        result = manipulate(cfg)
    # edited in the text's order, each edit starting from the previous result
    assert [c[1] for c in calls] == ["a red circle", "a blue square"]
    assert np.array_equal(calls[0][0], np.asarray(read_image(rgba_image)))
    assert np.array_equal(calls[1][0], calls[0][2])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "edited.png")), calls[1][2])
    words = [(e["word"], e["text"]) for e in result["edits"]]
    assert words == [("circle", "a red circle"), ("square", "a blue square")]
    for e in result["edits"]:
        sims = e["similarities"]
        assert len(e["chosen"]) == 1 and sims  # argmax: the best proposal
        assert sims[e["chosen"][0]] == max(s for s in sims if s == s)
    n = len(result["edits"][0]["similarities"])
    listed = [r.getMessage() for r in caplog.records if "proposal #" in r.getMessage()]
    assert len(listed) == 2 * n and sum("<- chosen" in m for m in listed) == 2
    edits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("edit ")]
    assert edits[0].startswith("edit 1/2: circle") and edits[1].startswith("edit 2/2: square")
    mask = _outputs(tmp_path / "out")["mask"] > 0
    assert mask.any() and mask.shape == (H, W)
    _check_kept_outside(tmp_path / "out", rgba_image, mask)


def test_select_picks_the_kth_best_and_the_ranking_comes_first(
    tmp_path: Path,
    inpaint_folder: Path,
    m2f_dir: Path,
    rgba_image: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    over = [f"image={rgba_image}", "entity=circle", "text=a red circle", "select=2"]
    cfg = _cfg(tmp_path, _diff(inpaint_folder) + _aligner(m2f_dir) + over)
    assert cfg.alignment.pick == 2
    with caplog.at_level(logging.INFO, logger="semani"):
        result = manipulate(cfg)
    sims = result["edits"][0]["similarities"]
    ranked = sorted((i for i, v in enumerate(sims) if v == v), key=lambda i: -sims[i])
    assert len(ranked) >= 2 and result["edits"][0]["chosen"] == [ranked[1]]  # the second best
    messages = [r.getMessage() for r in caplog.records]
    first_edit = next(i for i, m in enumerate(messages) if m.startswith("edit 1/1"))
    listed = [i for i, m in enumerate(messages) if "proposal #" in m]
    assert len(listed) == len(sims) and max(listed) < first_edit  # ranked before any edit
    cfg = _cfg(tmp_path, _diff(inpaint_folder) + _aligner(m2f_dir) + over[:-1] + ["select=99"])
    with pytest.raises(EntityNotFoundError, match="pick=99"):
        manipulate(cfg)


def test_semani_trans_with_user_mask(
    tmp_path: Path, trans_ckpt: Path, rgba_image: Path, mask_file: Path
) -> None:
    cfg = _cfg(
        tmp_path,
        ["method=semani_trans", f"editor.ckpt={trans_ckpt}", "editor.filter_thres=0.5",
         f"image={rgba_image}", f"mask={mask_file}", "text=a red circle"],
    )  # fmt: skip
    assert cfg.alignment.scorer._target_.endswith("TokenWiseScorer")  # the paper's for Trans
    manipulate(cfg)  # 45x70 -> 64x64 (8x8 tokens) -> 45x70
    _check_kept_outside(tmp_path / "out", rgba_image, _expected_mask())


def test_blended_ldm_with_user_mask(
    tmp_path: Path, text2image_folder: Path, rgba_image: Path, mask_file: Path
) -> None:
    base = ["method=blended_ldm", f"editor.source={text2image_folder}", "editor.steps=4",
            "editor.side=null",
            "editor.guidance_scale=1.0", f"image={rgba_image}", f"mask={mask_file}",
            "text=a red circle"]  # fmt: skip
    manipulate(_cfg(tmp_path, [*base, "editor.composite=true"]))
    _check_kept_outside(tmp_path / "out", rgba_image, _expected_mask())
    manipulate(_cfg(tmp_path, base))  # as published: the VAE's background
    edited = _outputs(tmp_path / "out")["edited"]
    assert edited.shape == (H, W, 3)
    assert not np.array_equal(edited, np.asarray(read_image(rgba_image)))


def test_semani_trans_aligns_on_its_token_grid(
    tmp_path: Path, trans_ckpt: Path, m2f_dir: Path, rgba_image: Path
) -> None:
    token_wise = ["alignment/scorer=token_wise", f"alignment.scorer.model_name={TINY_CLIP_NAME}",
                  "alignment.scorer.pretrained=null", "alignment.scorer.min_cells=1",
                  "alignment.threshold=-1", "alignment.min_tokens=1"]  # fmt: skip
    overrides = [
        *("method=semani_trans", f"editor.ckpt={trans_ckpt}", f"image={rgba_image}"),
        *("entity=circle", "text=a red circle", *_aligner(m2f_dir)[:4], *token_wise),
    ]
    with pytest.raises(SystemExit, match=r"fewer than 65 cells of the \(8, 8\) token grid"):
        main(_cfg(tmp_path, [*overrides, "alignment.min_tokens=65"]))  # 45x70 -> 8x8 tokens
    result = manipulate(_cfg(tmp_path, overrides))
    (edit,) = result["edits"]
    scored = [s for s in edit["similarities"] if s == s]
    assert len(edit["chosen"]) == len(scored) > 1  # threshold selection, every one >= -1
    mask = _outputs(tmp_path / "out")["mask"] > 0
    _check_kept_outside(tmp_path / "out", rgba_image, mask)


def test_strict_default_has_a_threshold_for_every_method() -> None:
    """manipulate.py and the app refuse a word under the threshold by default; every method
    (and the app's ShapesWorld fallback) configures one, so none fails to build; Table I keeps
    the paper's argmax."""
    methods = sorted(p.stem for p in (REPO_ROOT / "configs" / "method").glob("*.yaml"))
    for method in (m for m in methods if m != "predictions"):  # predictions: no alignment
        cfg = compose("manipulate", [f"method={method}"])
        assert cfg.alignment.threshold_mode == "strict", method
        threshold = cfg.alignment.threshold
        threshold = cfg.alignment.scorer.threshold if threshold is None else threshold
        assert isinstance(threshold, float), (method, threshold)
    app = compose("app", [])
    assert app.alignment.threshold_mode == "strict"
    assert isinstance(app.shapes.alignment.scorer.threshold, float)
    table1 = compose("eval", ["protocol=table1", "method=semani_diff", "data=cub"])
    assert table1.alignment.threshold_mode == "keep_best"


def test_method_configs_pick_the_papers_scorers() -> None:
    scorers = {e: compose("manipulate", [f"method={e}"]).alignment.scorer._target_
               for e in ("semani_diff", "semani_trans", "blended_ldm")}  # fmt: skip
    assert scorers == {
        "semani_diff": "semani.alignment.MaskPromptScorer",
        "semani_trans": "semani.alignment.TokenWiseScorer",
        "blended_ldm": "semani.alignment.MaskPromptScorer",
    }


# -- failures -------------------------------------------------------------------------------------
def test_unknown_entity_exits_nonzero_listing_the_proposals(
    tmp_path: Path,
    inpaint_folder: Path,
    m2f_dir: Path,
    rgba_image: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    strict = ["alignment.selection=threshold", "alignment.threshold=1.01",
              "alignment.threshold_mode=strict"]  # fmt: skip
    cfg = _cfg(
        tmp_path,
        _diff(inpaint_folder) + _aligner(m2f_dir, strict, mode=None)
        + [f"image={rgba_image}", "entity=zebra", "text=a zebra"],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="semani"):
        with pytest.raises(SystemExit) as exc:
            main(cfg)
    message = str(exc.value.code)
    assert message.startswith("error: no entity matches 'zebra'") and "\n" not in message
    assert "threshold 1.01" in message and "#0: " in message
    listed = [r.getMessage() for r in caplog.records if "proposal #" in r.getMessage()]
    assert listed and all("similarity" in m for m in listed)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_strict_is_the_default_and_select_1_edits_the_best_anyway(
    tmp_path: Path, inpaint_folder: Path, m2f_dir: Path, rgba_image: Path
) -> None:
    cfg = _cfg(
        tmp_path,
        _diff(inpaint_folder) + _aligner(m2f_dir, ["alignment.threshold=1.01"], mode=None)
        + [f"image={rgba_image}", "entity=zebra", "text=a zebra"],
    )  # fmt: skip
    assert cfg.alignment.threshold_mode == "strict"
    with pytest.raises(SystemExit) as exc:
        main(cfg)
    message = str(exc.value.code)
    assert "threshold 1.01" in message and "select=1" in message
    # the user's pick takes the best proposal whatever its score, and edits it
    result = manipulate(_cfg(tmp_path, [*_diff(inpaint_folder),
                                        *_aligner(m2f_dir, ["alignment.threshold=1.01"], None),
                                        f"image={rgba_image}", "entity=zebra", "text=a zebra",
                                        "select=1"]))  # fmt: skip
    (edit,) = result["edits"]
    sims = torch.tensor(edit["similarities"]).nan_to_num(-9)
    assert edit["chosen"] == [int(sims.argmax())] and float(sims.max()) < 1.01
    assert _outputs(tmp_path / "out")["mask"].any()


@pytest.mark.parametrize("case", ["junk", "missing", "no_ckpt"])
def test_user_errors_are_one_line(
    tmp_path: Path, inpaint_folder: Path, rgba_image: Path, case: str
) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    overrides, expected = {
        "junk": (_diff(inpaint_folder) + [f"image={junk}", "entity=bird", "text=a bird"],
                 f"error: cannot read image '{junk}'"),
        "missing": (_diff(inpaint_folder) + [f"image={tmp_path / 'nope.png'}", "entity=bird",
                                             "text=a bird"], "no such file"),
        "no_ckpt": (["method=semani_trans", f"image={rgba_image}", "text=a: b"],
                    "error: missing required editor.ckpt"),
    }[case]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(_cfg(tmp_path, overrides))
    assert expected in str(exc.value.code) and "\n" not in str(exc.value.code)


def test_cli_missing_model_is_one_line_and_nonzero(
    tmp_path: Path, rgba_image: Path, mask_file: Path
) -> None:
    missing = tmp_path / "no_such_model"
    cmd = [sys.executable, str(REPO_ROOT / "manipulate.py"), "method=semani_diff",
           f"editor.source={missing}", f"image={rgba_image}", f"mask={mask_file}",
           "text=a red circle", f"out={tmp_path / 'out'}",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr
    assert not (tmp_path / "out" / "edited.png").exists()


# -- hardening ------------------------------------------------------------------------------------
def test_an_unwritable_out_fails_before_any_model_is_built(
    tmp_path: Path, rgba_image: Path, mask_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semani.pipeline import EntityEditPipeline

    built = []
    monkeypatch.setattr(EntityEditPipeline, "from_config", lambda *a, **k: built.append(1))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = _cfg(tmp_path, ["method=semani_diff", f"image={rgba_image}", f"mask={mask_file}",
                          "text=a red circle", f"out={blocker / 'edits'}"])  # fmt: skip
    with pytest.raises(SystemExit, match=f"cannot write into out={blocker / 'edits'}"):
        main(cfg)
    assert not built


def test_the_three_outputs_are_written_as_one_set(
    tmp_path: Path, inpaint_folder: Path, rgba_image: Path, mask_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from semani.pipeline import EditResult

    cfg = _cfg(tmp_path, _diff(inpaint_folder)
               + [f"image={rgba_image}", f"mask={mask_file}", "text=a red circle"])  # fmt: skip
    manipulate(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EditResult, "overlay", broken)  # the third output fails
    with pytest.raises(OSError, match="No space left"):
        manipulate(
            _cfg(
                tmp_path,
                _diff(inpaint_folder)
                + [f"image={rgba_image}", f"mask={mask_file}", "text=a blue circle", "seed=5"],
            )
        )
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert after == before  # none of the new set was renamed in, no temporary left


def test_a_one_pixel_high_image(tmp_path: Path, inpaint_folder: Path) -> None:
    image = tmp_path / "line.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 40, 3), np.uint8)).save(image)
    mask = tmp_path / "line_mask.png"
    m = np.zeros((1, 40), np.uint8)
    m[0, 10:20] = 255
    Image.fromarray(m).save(mask)
    manipulate(_cfg(tmp_path, _diff(inpaint_folder)
                    + [f"image={image}", f"mask={mask}", "text=a red line"]))  # fmt: skip
    got = np.asarray(Image.open(tmp_path / "out" / "edited.png"))
    assert got.shape == (1, 40, 3)
    assert np.array_equal(got[0, :10], np.asarray(Image.open(image))[0, :10])


def test_a_text_longer_than_the_encoder_reads_is_warned(
    tmp_path: Path, inpaint_folder: Path, rgba_image: Path, mask_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    long = "a small red bird " * 20 + "with a zebra"
    overrides = [
        *_diff(inpaint_folder),
        f"image={rgba_image}",
        f"mask={mask_file}",
        f"text={long}",
    ]
    with caplog.at_level(logging.WARNING, logger="semani"):
        manipulate(_cfg(tmp_path, overrides))
    warned = [r.getMessage() for r in caplog.records if "is dropped" in r.getMessage()]
    assert warned and "the text encoder reads 77" in warned[0] and "zebra" in warned[0]
