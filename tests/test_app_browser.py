"""The Gradio app in a real browser: Debian's Chromium driven by playwright (marked `browser`:
`make test-all` runs it, installing both where missing; skipped with the reason when either is
absent). On tiny random models with the ShapesWorld examples: the empty page (the table's
headers, an empty threshold, the examples), an edit typed and clicked (result, mask, proposals
and their table), an entity that is not found (the error, no server path), and
scripts/app_screenshot.py into a temporary folder."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests import test_app
from tests.test_app import H, W, _models, _serve

m2f_dir, photo = test_app.m2f_dir, test_app.photo  # its fixtures, shared

pytestmark = pytest.mark.browser

pytest.importorskip(
    "playwright.sync_api", reason='playwright is not installed: pip install -e ".[browser]"'
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "app_screenshot.py"


def _script() -> Any:
    """scripts/app_screenshot.py as a module (its Chromium helpers)."""
    spec = importlib.util.spec_from_file_location("app_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shot = _script()
CHROMIUM = shot.find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "no Chromium: apt-get install chromium (make test-all installs it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def url(
    tmp_path_factory: pytest.TempPathFactory,
    inpaint_folder: Path,
    m2f_dir: Path,
    shapes_root: Path,
):
    """The app on tiny models with the ShapesWorld test images as examples."""
    for client in _serve(
        tmp_path_factory.mktemp("browser_app"), inpaint_folder, m2f_dir,
        f"shapes.examples_dir={shapes_root}", "shapes.num_examples=2",
    ):  # fmt: skip
        yield client.src


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = shot.open_chromium(p, CHROMIUM, tmp_path_factory.mktemp("chromium_profile"))
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any, url: str):
    page = browser.new_page()
    page.goto(url)
    page.locator("#edit").wait_for()
    try:
        yield page
    finally:
        page.close()


def _headers(page: Any) -> list[str]:
    """The proposals table's column headers, as shown."""
    return [h.strip() for h in page.locator("#table [role=columnheader]").all_inner_texts()]


def _rows(page: Any) -> list[list[str]]:
    """The proposals table's rows (the grid's rows, not its hidden sizing copy)."""
    return [
        [c.strip() for c in row.locator("[role=gridcell]").all_inner_texts()]
        for row in page.locator("#table .virtual-row[role=row]").all()
    ]


def _image(page: Any, selector: str) -> np.ndarray:
    """The image an <img> of the page shows, fetched as the browser does."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, src
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def test_empty_page(page: Any) -> None:
    """Before any edit: the proposals table has its headers, the threshold box is empty,
    the ShapesWorld examples are offered (with the configured models)."""
    from semani.app import EMPTY_TABLE

    assert _headers(page) == EMPTY_TABLE
    assert page.locator("#threshold textarea, #threshold input").first.input_value() == ""
    assert page.get_by_text("ShapesWorld examples").count() >= 1
    assert shot.message_of(page) == ""


def test_edit_and_unknown_word(page: Any, photo: Path) -> None:
    """Upload, type, press Edit: the result (the input's size, unchanged outside the mask),
    the mask, every proposal in the overlay and the table; then a word that is not found."""
    message = shot.edit_on_page(page, "circle", "a red circle", photo)
    assert message.startswith("Edited 1 entity ('circle' -> #"), message
    source = np.asarray(Image.open(photo).convert("RGB"))
    result = _image(page, "#result")
    chosen = _image(page, "#mask")[..., 0] > 127
    assert result.shape == (H, W, 3) and chosen.shape == (H, W)
    assert chosen.any() and np.array_equal(result[~chosen], source[~chosen])
    assert _headers(page)[:3] == ["proposal", "similarity to 'circle'", "chosen for"]
    rows = _rows(page)
    assert len(rows) > 1 and [row[2] for row in rows].count("circle") == 1
    labels = page.locator("#proposals button").all_inner_texts()
    legend = [t.strip() for t in labels if t.strip().startswith("#")]
    assert len(legend) == len(rows) and sum("✓" in t for t in legend) == 1, legend
    # an unknown word under a strict threshold: the error, the proposals, no result
    page.locator("#threshold textarea, #threshold input").first.fill("1")
    page.get_by_label("strict").check()
    message = shot.edit_on_page(page, "zebra", "a zebra")
    assert message.startswith("error: no entity matches 'zebra'"), message
    assert "/tmp/" not in message and str(photo.parent) not in message
    assert _headers(page)[1] == "similarity to 'zebra'" and len(_rows(page)) == len(rows)
    assert page.locator("#result img").count() == 0


def test_screenshot_script(
    tmp_path: Path,
    inpaint_folder: Path,
    m2f_dir: Path,
    shapes_root: Path,
    browser: Any,
) -> None:
    """scripts/app_screenshot.py serves the app, edits the first ShapesWorld test image in
    Chromium and saves a small PNG (here with tiny random models)."""
    cfg = shot.compose_app(
        ["alignment/segmenter=mask2former", "alignment/scorer=masked_crop_clip",
         *_models("", inpaint_folder, m2f_dir), f"shapes.examples_dir={shapes_root}"]
    )  # fmt: skip
    out = tmp_path / "docs" / "app_screenshot.png"
    report = shot.screenshot(cfg, out, width=800, context=browser)
    assert report["message"].startswith(f"Edited 1 entity ('{report['entity']}' -> #")
    assert report["text"].endswith(report["entity"])
    image = Image.open(out)
    assert image.width == 800 and image.height > 400
    assert out.stat().st_size == report["bytes"] < 150_000


def test_a_clicked_proposal_is_edited_next(page: Any, photo: Path) -> None:
    """Click a row of the proposals table: the select box names that proposal, and the next
    Edit changes that one."""
    message = shot.edit_on_page(page, "circle", "a red circle", photo)
    assert message.startswith("Edited 1 entity"), message
    rows = _rows(page)
    chosen = next(i for i, row in enumerate(rows) if row[2] == "circle")
    other = next(i for i in range(len(rows)) if i != chosen)
    page.locator("#table .virtual-row[role=row]").nth(other).locator(
        "[role=gridcell]"
    ).first.click()
    box = page.locator("#select textarea, #select input").first
    page.wait_for_function(
        "([el, want]) => el.value === want", arg=[box.element_handle(), f"#{other}"]
    )
    message = shot.edit_on_page(page, "circle", "a red circle")
    assert message.startswith(f"Edited 1 entity ('circle' -> #{other}"), message
    assert [row[2] for row in _rows(page)].index("circle") == other
