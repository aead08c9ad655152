"""The Gradio app (`python -m semani.app`) on tiny random models: served on localhost and called
with `gradio_client` (an edit, an entity that is not found, an unreadable image), the ShapesWorld
fallback with its examples, and a start with no weights at all."""

from __future__ import annotations

import functools
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from semani.modules.clip import TINY_CLIP_NAME
from tests.conftest import compose

pytest.importorskip("gradio", reason='the app extra is not installed: pip install -e ".[app]"')
pytest.importorskip("gradio_client", reason="gradio_client comes with gradio")

from semani.app import EMPTY_TABLE, build_app, launch, load_models, run_edit  # noqa: E402

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


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, inpaint_folder: Path, m2f_dir: Path):
    """The app served on a free localhost port with the configured tiny models."""
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("app")
    cfg = compose(
        "app",
        ["alignment/segmenter=mask2former", "alignment/scorer=masked_crop_clip",
         *_models("", inpaint_folder, m2f_dir), f"server_port={_free_port()}"],
        tmp,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no network
        demo = launch(cfg, prevent_thread_lock=True, quiet=True)
        try:
            yield Client(demo.local_url, verbose=False)
        finally:
            demo.close()


def _edit(client: Any, image: Path, entity: str, text: str, **kw: Any) -> tuple:
    from gradio_client import handle_file

    args = {"steps": 2, "guidance": 1.0, "seed": 0, "threshold": None, "strict": False, **kw}
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
        client, photo, "zebra", "a zebra", threshold=1.01, strict=True
    )
    assert message.startswith("error: no entity matches 'zebra'") and "#" in message
    assert "threshold 1.01" in message
    assert table["headers"][1] == "similarity to 'zebra'"
    assert all(isinstance(row[1], float) and row[2] == "" for row in table["data"])
    assert len(proposals["value"]["annotations"]) == len(table["data"])
    assert mask is None and result is None


def test_bad_inputs_are_messages(client: Any, photo: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really a png")
    message, proposals, *outputs = _edit(client, junk, "circle", "a red circle")
    assert message.startswith("error: cannot read image") and proposals["value"] is None
    assert outputs == [{"headers": EMPTY_TABLE, "data": [], "metadata": None}, None, None]
    message, *_ = _edit(client, photo, "circle", "  ")
    assert message.startswith("error: text is empty")
    message, *_ = _edit(client, photo, "circle", "a red circle", strict=True)
    assert message.startswith("error: strict needs a threshold")


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


def test_no_weights_starts_with_a_message(tmp_path: Path, photo: Path) -> None:
    cfg = compose("app", [f"paths.pretrained_dir={tmp_path / 'empty'}"], tmp_path)
    models = load_models(cfg)
    assert models.kind == "none" and models.pipeline is None
    notice = models.notice
    assert notice.startswith("**No models loaded.**")
    assert str(tmp_path / "empty" / "stable-diffusion-inpainting") in notice  # configured
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
