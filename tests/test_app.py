"""The Gradio app (`python -m semani.app`) on tiny random models: served on localhost and called
with `gradio_client` (an edit, an entity that is not found, an unreadable image), the limits of a
shared server (upload bytes and pixels, the working copy at `max_side`, every argument checked,
no server path in a message), the ShapesWorld fallback with its examples, and a start with no
weights at all or a corrupt checkpoint."""

from __future__ import annotations

import functools
import os
import pickle
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from semani.modules.clip import TINY_CLIP_NAME
from tests.conftest import compose

pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")

from semani.app import EMPTY_TABLE, Models, build_app, launch, load_models, run_edit  # noqa: E402
from semani.app_limits import Limits  # noqa: E402

H, W = 45, 70  # non-square and off the VAE grid


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random one-class Mask2Former that proposes segments on any image."""
    from tests.test_segmenters import tiny_mask2former

    return tiny_mask2former(tmp_path_factory.mktemp("m2f") / "tiny")


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _models(prefix: str, inpaint: Path, m2f: Path) -> list[str]:
    """Tiny SeMani-Diff (2 steps) and a tiny Mask2Former + random CLIP on masked crops."""
    return [
        f"{prefix}editor.source={inpaint}", f"{prefix}editor.steps=2", f"{prefix}editor.side=null",
        f"{prefix}alignment.segmenter.model_name_or_path={m2f}",
        f"{prefix}alignment.segmenter.threshold=0.1",
        f"{prefix}alignment.segmenter.overlap_mask_area_threshold=0",
        f"{prefix}alignment.scorer.model_name={TINY_CLIP_NAME}",
        f"{prefix}alignment.scorer.pretrained=null",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp: Path, inpaint: Path, m2f: Path, *overrides: str):
    """The app served on a free localhost port with the configured tiny models: a
    `gradio_client.Client` (closed with the generator)."""
    from gradio_client import Client

    cfg = compose(
        "app",
        ["alignment/segmenter=mask2former", "alignment/scorer=masked_crop_clip",
         *_models("", inpaint, m2f), f"server_port={_free_port()}", *overrides],
        tmp,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no network
        demo = launch(cfg, prevent_thread_lock=True, quiet=True)
        try:
            yield Client(demo.local_url, verbose=False)
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, inpaint_folder: Path, m2f_dir: Path):
    """The app with the configured tiny models and the default limits."""
    yield from _serve(tmp_path_factory.mktemp("app"), inpaint_folder, m2f_dir)


# the `limited` app's limits
MAX_FILE_SIZE, MAX_PIXELS, MAX_SIDE = 64 * 2**10, 1_000_000, 48


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, inpaint_folder: Path, m2f_dir: Path):
    """The app with tiny limits: 64 kb uploads, 1 megapixel, a longer side of 48 px."""
    yield from _serve(
        tmp_path_factory.mktemp("limited"), inpaint_folder, m2f_dir,
        "max_file_size=64kb", f"max_pixels={MAX_PIXELS}", f"max_side={MAX_SIDE}",
    )  # fmt: skip


def _edit(client: Any, image: Path, entity: str, text: str, **kw: Any) -> tuple:
    from gradio_client import handle_file

    args = {"steps": 2, "guidance": 1.0, "seed": 0, "threshold": None, "strict": False,
            "select": "best", **kw}  # fmt: skip
    return client.predict(handle_file(str(image)), entity, text, *args.values(), api_name="/edit")


def test_edit_through_the_client(
    client: Any, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semani.manipulation.diff_editor import DiffEditor

    calls: list[dict] = []
    edit = DiffEditor.edit

    @functools.wraps(edit)
    def spy(self, image, mask, text, **kwargs):
        calls.append({"text": text, **kwargs})
        return edit(self, image, mask, text, **kwargs)

    monkeypatch.setattr(DiffEditor, "edit", spy)  # the server runs in this process
    message, proposals, table, mask, result = _edit(
        client, photo, "circle", "a red circle", steps=3, guidance=1.5, seed=7
    )
    assert message.startswith("Edited 1 entity ('circle' -> #"), message
    assert calls == [{"text": "a red circle", "seed": 7, "steps": 3, "guidance_scale": 1.5}]
    # the result: the input's size, every pixel outside the chosen mask the input's
    source = np.asarray(Image.open(photo))
    edited = np.asarray(Image.open(result).convert("RGB"))
    chosen = np.asarray(Image.open(mask).convert("L")) > 127
    assert edited.shape == (H, W, 3) and chosen.shape == (H, W)
    assert chosen.any() and not chosen.all()
    assert np.array_equal(edited[~chosen], source[~chosen])
    assert not np.array_equal(edited[chosen], source[chosen])
    # every proposal with its similarity; the chosen one is the best (argmax) and is the mask
    headers, rows = table["headers"], table["data"]
    assert headers[:3] == ["proposal", "similarity to 'circle'", "chosen for"]
    sims = [row[1] for row in rows]
    assert len(rows) > 1 and all(isinstance(s, float) for s in sims)
    (best,) = [i for i, row in enumerate(rows) if row[2] == "circle"]
    assert sims[best] == max(sims)
    annotations = proposals["value"]["annotations"]  # an update: its colours come with it
    labels = [a["label"] for a in annotations]
    assert len(labels) == len(rows) and labels[best] == f"#{best}: {sims[best]:.3f} ✓"
    assert len(set(proposals["color_map"].values())) == len(rows)  # a colour each
    overlay_mask = np.asarray(Image.open(annotations[best]["image"]))
    assert np.array_equal(overlay_mask[..., 3] > 0, chosen)


def test_unknown_entity_is_a_message(client: Any, photo: Path) -> None:
    message, proposals, table, mask, result = _edit(
        client, photo, "zebra", "a zebra", threshold=1.0, strict=True
    )
    assert message.startswith("error: no entity matches 'zebra'") and "#" in message
    assert "threshold 1.0" in message, message
    assert table["headers"][1] == "similarity to 'zebra'"
    assert all(isinstance(row[1], float) and row[2] == "" for row in table["data"])
    assert len(proposals["value"]["annotations"]) == len(table["data"])
    assert mask is None and result is None


def test_bad_inputs_are_messages(client: Any, photo: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really a png")
    message, proposals, *outputs = _edit(client, junk, "circle", "a red circle")
    assert message.startswith("error: cannot read image 'junk.png':"), message
    _no_server_path(message, junk)
    assert proposals["value"] is None
    assert outputs == [{"headers": EMPTY_TABLE, "data": [], "metadata": None}, None, None]
    message, *_ = _edit(client, photo, "circle", "  ")
    assert message.startswith("error: text is empty")


def test_strict_without_any_threshold_is_an_error() -> None:
    """A scorer configured without a threshold (alignment.scorer.threshold=null): the strict box
    or select=all has nothing to compare with."""
    from types import SimpleNamespace

    from semani.app import _with_selection

    aligner = SimpleNamespace(pick="best", selection="argmax", threshold=None,
                              threshold_mode="keep_best", scorer=SimpleNamespace())  # fmt: skip
    pipeline = SimpleNamespace(aligner=aligner, editor=None)
    with pytest.raises(ValueError, match="strict needs a threshold: SimpleNamespace has none"):
        _with_selection(pipeline, None, True)
    with pytest.raises(ValueError, match="select=all needs a threshold"):
        _with_selection(pipeline, None, False, "all")


def _no_server_path(message: str, *paths: Path) -> None:
    """No path of the server's in a message: not gradio's upload folder (/tmp/gradio/<sha>/...),
    nothing under /tmp/, none of `paths`."""
    import gradio.utils

    for path in (gradio.utils.get_upload_folder(), "/tmp/", *map(str, paths)):
        assert str(path) not in message, message


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"steps": 0}, "steps must be a whole number from 1 to 200, got 0"),
        ({"steps": -3}, "steps must be a whole number from 1 to 200, got -3"),
        ({"steps": 999}, "steps must be a whole number from 1 to 200, got 999"),
        ({"steps": 1000}, "steps must be a whole number from 1 to 200, got 1000"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": "abc"}, "steps must be a whole number from 1 to 200, got 'abc'"),
        ({"guidance": -1}, "guidance must be a number from 0 to 20, got -1"),
        ({"guidance": 20.5}, "guidance must be a number from 0 to 20"),
        ({"guidance": "x"}, "guidance must be a number"),
        ({"seed": -1}, "seed must be a whole number from 0 to 2147483647, got -1"),
        ({"seed": 2**31}, "seed must be a whole number from 0 to 2147483647"),
        ({"seed": None}, "seed must be a whole number from 0 to 2147483647, got nothing"),
        ({"threshold": 1.5}, "threshold must be empty or a number from -1 to 1, got 1.5"),
        ({"threshold": "abc"}, "threshold must be empty or a number from -1 to 1, got 'abc'"),
        ({"strict": "yes"}, "strict must be true or false, got 'yes'"),
        ({"select": "0"}, "select must be best, all, a rank"),
        ({"select": "first"}, "select must be best, all, a rank (1: the best proposal"),
        ({"select": "#x"}, "select must be best, all, a rank"),
        ({"entity": "c" * 201}, "entity is 201 characters long: at most 200"),
        ({"text": "a" * 501}, "text is 501 characters long: at most 500"),
    ],
)
def test_arguments_are_checked_on_the_server(
    client: Any, photo: Path, monkeypatch: pytest.MonkeyPatch, bad: dict, expected: str
) -> None:
    """Through the API, out of range or ill-typed: an error naming the value, nothing run."""
    from semani.pipeline import EntityEditPipeline

    def no_call(*args, **kwargs):
        raise AssertionError("the pipeline ran on a refused request")

    monkeypatch.setattr(EntityEditPipeline, "propose", no_call)
    args = {"entity": "circle", "text": "a red circle", **bad}
    entity, text = args.pop("entity"), args.pop("text")
    message, proposals, table, mask, result = _edit(client, photo, entity, text, **args)
    assert message.startswith(f"error: {expected}"), message
    assert proposals["value"] is None and mask is None and result is None
    _no_server_path(message, photo)


def test_threshold_is_empty_or_a_number(client: Any, photo: Path) -> None:
    """The threshold box's text: blank is no threshold, a number in range is one."""
    for threshold in ("", "  ", "-1", "0.25"):
        message, *_ = _edit(client, photo, "circle", "a red circle", threshold=threshold)
        assert message.startswith("Edited 1 entity"), (threshold, message)
    # blank with strict: the scorer's own threshold (masked_crop_clip's 0.2; the random scores
    # stay under it)
    message, *_ = _edit(client, photo, "circle", "a red circle", threshold="", strict=True)
    assert message.startswith("error: no entity matches 'circle'") and "threshold 0.2" in message


def test_select_picks_the_instance(client: Any, photo: Path) -> None:
    """select=2: the second best proposal of the table is edited; all: every one at or above
    the threshold; a rank past the proposals is a message with the ranking."""
    message, _, table, *_ = _edit(client, photo, "circle", "a red circle", select="2")
    rows = table["data"]
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i][1])
    assert message.startswith(f"Edited 1 entity ('circle' -> #{ranked[1]}"), message
    assert [i for i, row in enumerate(rows) if row[2] == "circle"] == [ranked[1]]
    threshold = rows[ranked[2]][1]  # the third best's similarity: three are chosen
    _, _, table, *_ = _edit(client, photo, "circle", "a red circle", select="all",
                            threshold=str(threshold))  # fmt: skip
    assert sorted(i for i, row in enumerate(table["data"]) if row[2] == "circle") == sorted(
        ranked[:3]
    )
    message, *_ = _edit(client, photo, "circle", "a red circle", select=str(len(rows) + 1))
    assert message.startswith("error: no entity matches 'circle'") and "pick=" in message
    # a click on a proposal (the image's annotation or a table row) selects it by its number
    from semani.app import picked_proposal

    assert picked_proposal(ranked[-1]) == picked_proposal([ranked[-1], 2]) == f"#{ranked[-1]}"
    message, _, table, *_ = _edit(client, photo, "circle", "a red circle",
                                  select=picked_proposal(ranked[-1]))  # fmt: skip
    assert message.startswith(f"Edited 1 entity ('circle' -> #{ranked[-1]}"), message


def test_public_message_names_files_only() -> None:
    """The upload's path (as given or resolved) becomes its name, any other absolute path its
    last part; URLs, relative paths and fractions stay."""
    from semani.app_limits import public_message

    upload = "/tmp/gradio/3f2a/photo.png"
    message = (
        f"cannot read image '{upload}': see /srv/app/pretrained/model.ckpt, "
        "https://example.com/a/b, data/shapes/x.png and 1/2 of it"
    )
    assert public_message(message, upload) == (
        "cannot read image 'photo.png': see model.ckpt, https://example.com/a/b, "
        "data/shapes/x.png and 1/2 of it"
    )


def test_oversized_upload_is_refused(limited: Any, tmp_path: Path) -> None:
    """Over max_file_size: gradio_client refuses to send it, the server's upload route refuses
    it (413) and caches nothing; run_edit refuses a larger file it is given anyway."""
    import gradio.utils
    import httpx

    big = tmp_path / "big_upload.png"
    big.write_bytes(np.random.default_rng(0).bytes(MAX_FILE_SIZE + 2**10))
    with pytest.raises(ValueError, match="maximum file size"):
        _edit(limited, big, "circle", "a red circle")
    with big.open("rb") as f:
        response = httpx.post(
            limited.src.rstrip("/") + "/gradio_api/upload",
            files={"files": (big.name, f, "image/png")},
        )
    assert response.status_code == 413 and "File size exceeded" in response.text
    assert not list(Path(gradio.utils.get_upload_folder()).glob(f"*/{big.name}"))
    models = Models(pipeline=object(), kind="configured")  # refused before it is used
    out = run_edit(models, big, "circle", "a red circle", limits=Limits(MAX_FILE_SIZE))
    assert out.message == (
        "error: the uploaded file 'big_upload.png' is 65.0 kB: this server takes at most "
        "64.0 kB (max_file_size)"
    )
    _no_server_path(out.message, big)


def test_too_many_pixels_is_refused_from_the_header(
    limited: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5000x5000 PNG of a few kB (25 megapixels, over max_pixels) is refused before it is
    decoded; over Pillow's decompression-bomb limit, with the same message."""
    import semani.app

    huge = tmp_path / "huge.png"
    Image.new("1", (5000, 5000)).save(huge)  # bilevel zeros: compresses to a few kB
    assert huge.stat().st_size < MAX_FILE_SIZE
    decoded: list[Any] = []
    monkeypatch.setattr(semani.app, "read_image", lambda path: decoded.append(path))
    message, proposals, table, mask, result = _edit(limited, huge, "circle", "a red circle")
    assert message == (
        "error: the uploaded image 'huge.png' has 25.0 megapixels (5000x5000): this server "
        "takes at most 1 megapixels (max_pixels); scale it down and upload it again"
    )
    assert decoded == [] and proposals["value"] is None and result is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # Pillow's bomb error: > 100,000
    bomb, *_ = _edit(limited, huge, "circle", "a red circle")
    assert bomb == (
        "error: the uploaded image 'huge.png' has 25.0 megapixels: this server takes at most "
        "0.1 megapixels (max_pixels); scale it down and upload it again"
    )
    assert decoded == []
    _no_server_path(message + bomb, huge)


def test_large_image_is_edited_at_max_side(limited: Any, photo: Path) -> None:
    """70x45 over max_side=48: proposals on the 48x31 copy, the result at 70x45 with every
    pixel outside the chosen mask (resized nearest) the upload's, bit for bit."""
    message, proposals, table, mask, result = _edit(limited, photo, "circle", "a red circle")
    assert message.startswith("Edited 1 entity ('circle' -> #"), message
    assert message.endswith("Edited at 48x31 (max_side 48) and pasted into the 70x45 upload.")
    source = np.asarray(Image.open(photo))
    edited = np.asarray(Image.open(result).convert("RGB"))
    chosen = np.asarray(Image.open(mask).convert("L")) > 127
    assert edited.shape == (H, W, 3) and chosen.shape == (H, W)
    assert chosen.any() and not chosen.all()
    assert np.array_equal(edited[~chosen], source[~chosen])
    assert not np.array_equal(edited[chosen], source[chosen])
    shown = Image.open(proposals["value"]["image"])
    assert shown.size == (48, 31) and len(table["data"]) > 0
    _no_server_path(message, photo)


def test_shapes_fallback_with_examples(
    tmp_path: Path, inpaint_folder: Path, m2f_dir: Path, shapes_root: Path
) -> None:
    missing = tmp_path / "no_such_model"
    cfg = compose(
        "app",
        [f"editor.source={missing}", *_models("shapes.", inpaint_folder, m2f_dir),
         f"shapes.examples_dir={shapes_root}", "shapes.num_examples=2"],
        tmp_path,
    )  # fmt: skip
    models = load_models(cfg)
    assert models.kind == "ShapesWorld" and str(missing) in models.notice
    assert len(models.examples) == 2
    image, entity, text = models.examples[0]
    assert Path(image).is_file() and text.startswith("a ") and text.endswith(f" {entity}")
    out = run_edit(models, image, entity, text, steps=2, guidance=1.0)
    assert out.result is not None and out.result.size == Image.open(image).size, out.message
    build_app(cfg, models)  # with gr.Examples


def _examples_label(demo: Any) -> list[str]:
    import gradio as gr

    return [b.label for b in demo.blocks.values() if isinstance(b, gr.Dataset)]


def test_configured_models_offer_the_shapes_examples(
    tmp_path: Path, inpaint_folder: Path, m2f_dir: Path, shapes_root: Path
) -> None:
    """The ShapesWorld test images are examples whenever they exist, with the configured
    models too (labelled as ShapesWorld's); none when they do not."""
    base = ["alignment/segmenter=mask2former", "alignment/scorer=masked_crop_clip",
            *_models("", inpaint_folder, m2f_dir), "shapes.num_examples=3"]  # fmt: skip
    cfg = compose("app", [*base, f"shapes.examples_dir={shapes_root}"], tmp_path)
    models = load_models(cfg)
    assert models.kind == "configured" and models.notice == ""
    assert len(models.examples) == 3 and all(Path(row[0]).is_file() for row in models.examples)
    for _, entity, text in models.examples:  # another colour, with its article ("an orange")
        assert text.endswith(f" {entity}") and text.split()[0] in ("a", "an")
        assert (text.split()[0] == "an") == (text.split()[1][0] in "aeiou")
    assert _examples_label(build_app(cfg, models)) == ["ShapesWorld examples (test images, 64 px)"]
    cfg = compose("app", [*base, f"shapes.examples_dir={tmp_path / 'none'}"], tmp_path)
    models = load_models(cfg)
    assert models.kind == "configured" and models.examples == []
    assert _examples_label(build_app(cfg, models)) == []


@pytest.fixture(scope="module")
def trans_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SeMani-Trans checkpoint, as tests/test_manipulate.py writes it."""
    from tests.test_manipulate import trans_ckpt

    return trans_ckpt.__wrapped__(tmp_path_factory)


class _RunsCode:
    """A pickle payload that runs a shell command when it is unpickled without weights_only."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _broken_checkpoint(kind: str, folder: Path, real: Path, marker: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = real.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "runs_code":
        torch.save({"state_dict": {}, "payload": _RunsCode(f"touch {marker}")}, path)
        assert b"system" in path.read_bytes() or b"posix" in path.read_bytes()
    elif kind == "runs_code_pickle":  # a bare pickle, not torch's zip format
        path.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}"), protocol=2))
    return path


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("truncated", "truncated"),
        ("empty", "is empty"),
        ("corrupt", ""),  # random bytes: named, the problem as torch's unpickler sees it
        ("tensor", "holds a Tensor"),
        ("runs_code", "posix.system"),
        ("runs_code_pickle", "posix.system"),
    ],
)
def test_broken_checkpoint_starts_with_a_notice(
    tmp_path: Path, trans_ckpt: Path, m2f_dir: Path, kind: str, problem: str
) -> None:
    """A SeMani-Trans app whose checkpoint is broken or refused by the weights-only loader
    starts (no ShapesWorld models either: none), its notice naming the file; nothing in the
    file was run."""
    marker = tmp_path / "code_ran"
    ckpt = _broken_checkpoint(kind, tmp_path, trans_ckpt, marker)
    cfg = compose(
        "app",
        ["method=semani_trans", f"editor.ckpt={ckpt}", "alignment/segmenter=mask2former",
         f"alignment.segmenter.model_name_or_path={m2f_dir}",
         f"alignment.scorer.model_name={TINY_CLIP_NAME}", "alignment.scorer.pretrained=null",
         f"paths.pretrained_dir={tmp_path / 'empty'}", f"server_port={_free_port()}"],
        tmp_path,
    )  # fmt: skip
    models = load_models(cfg)
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert models.kind == "none" and models.pipeline is None
    assert models.notice.startswith("**No models loaded.** The configured models cannot be ")
    configured = models.notice.split(" Nor the ShapesWorld models")[0]
    assert str(ckpt) in configured and problem in configured, configured  # file and problem
    assert "Traceback" not in models.notice
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = launch(cfg, prevent_thread_lock=True, quiet=True)
        try:
            import httpx

            assert httpx.get(demo.local_url).status_code == 200
        finally:
            demo.close()
    assert not marker.exists()


def test_no_weights_starts_with_a_message(tmp_path: Path, photo: Path) -> None:
    cfg = compose("app", [f"paths.pretrained_dir={tmp_path / 'empty'}"], tmp_path)
    models = load_models(cfg)
    assert models.kind == "none" and models.pipeline is None
    notice = models.notice
    assert notice.startswith("**No models loaded.**")
    assert str(cfg.editor.source).startswith(str(tmp_path / "empty"))
    assert str(cfg.editor.source) in notice  # configured
    assert str(tmp_path / "empty" / "semani_diff_shapes") in notice  # the fallback's
    assert "python train.py experiment=semani_diff_shapes" in notice
    assert "python train.py experiment=clip_shapes" in notice
    build_app(cfg, models)
    assert run_edit(models, str(photo), "circle", "a red circle").message == notice


def test_command_line_composes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`python -m semani.app method=... server_port=...`: the @hydra.main finds configs/app.yaml
    (`--cfg job` prints the composed config instead of serving)."""
    from semani.app import main

    argv = ["semani.app", "method=semani_diff", "editor.source=/x/sd", "server_port=7861",
            "--cfg", "job"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    out = capsys.readouterr().out
    assert "server_port: 7861" in out and "source: /x/sd" in out and "share: false" in out
