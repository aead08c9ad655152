"""Serve the app and screenshot a ShapesWorld edit in Chromium (e.g. for the README).

    python scripts/app_screenshot.py --out docs/app_screenshot.png [app overrides ...]

The app is built as `python -m semani.app [overrides]` builds it: the configured models, else the
ShapesWorld ones. A screenshot worth showing needs the trained ShapesWorld models
(`make shapes-models`: pretrained/semani_diff_shapes, pretrained/entityseg_shapes,
pretrained/clip/semani-shapes-ViT.pt) and the ShapesWorld test images (`shapes.examples_dir`);
with random models the page works but the edit means nothing. The first test image (or
`--example k`) is uploaded, its first entity named and recoloured ("circle" -> "a blue
circle", as the app's examples are), Edit is pressed, and the page down to the result is
captured, scaled to `--width` px and saved as a palette PNG (about 100 kB).

Chromium is driven by playwright without `playwright install` (nothing is downloaded):
`pip install -e ".[browser]"` and Debian's `apt-get install chromium` (or `--chromium <binary>`,
or $CHROMIUM). The browser test (tests/test_app_browser.py) uses the helpers below.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("app_screenshot")

# offline and headless: no sandbox (root in a container), no GPU, nothing fetched at start
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# the page's message once an edit is done (or refused)
DONE = r"^(Edited|error:|Upload an image)"


def find_chromium(given: str | None = None) -> str | None:
    """The Chromium binary: `given`, $CHROMIUM, or chromium / chromium-browser on the PATH."""
    for candidate in (given, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


def open_chromium(playwright: Any, executable: str, user_data_dir: str | os.PathLike) -> Any:
    """A headless Chromium context (1280 px wide) on a fresh profile folder."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir),
        executable_path=executable,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 1000},
    )


def message_of(page: Any) -> str:
    """The page's message (what the last edit did, or why not)."""
    return page.locator("#message").inner_text().strip()


def edit_on_page(
    page: Any,
    entity: str,
    text: str,
    image: str | os.PathLike | None = None,
    timeout_ms: float = 120_000,
) -> str:
    """Upload `image` (unless None: the one already there), type the entity and the text,
    press Edit and wait for a new message; returns it."""
    import re

    if image is not None:
        page.locator("#image input[type=file]").set_input_files(str(image))
        page.locator("#image img").first.wait_for(timeout=timeout_ms)
    page.locator("#entity textarea").fill(entity)
    page.locator("#text textarea").fill(text)
    before = message_of(page)
    page.locator("#edit").click()
    page.wait_for_function(
        """([before, done]) => {
            const text = document.querySelector('#message').innerText.trim();
            return text !== before && new RegExp(done).test(text);
        }""",
        arg=[before, DONE],
        timeout=timeout_ms,
    )
    message = message_of(page)
    if not re.match(DONE, message):
        raise RuntimeError(f"unexpected message: {message!r}")
    return message


def compose_app(overrides: Sequence[str]) -> Any:
    """configs/app.yaml with `overrides`, as `python -m semani.app` composes it (the server
    port defaults to the first free one from 7860)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from semani.app import CONFIG_DIR

    overrides = list(overrides)
    if not any(o.startswith("server_port=") for o in overrides):
        overrides.append("server_port=null")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("app", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)  # ${hydra:...} interpolations resolve
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def save_small(png: bytes, out: Path, width: int) -> int:
    """A screenshot scaled to `width` px and saved as a 128-colour PNG; returns its bytes."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(png)).convert("RGB")
    if shot.width > width:
        height = round(shot.height * width / shot.width)
        shot = shot.resize((width, height), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out.stat().st_size


def _capture(context: Any, url: str, image: str, entity: str, text: str) -> tuple[str, bytes]:
    """The edit done on a new page of `context`: its message and the page down to the result
    (PNG bytes)."""
    page = context.new_page()
    try:
        page.goto(url)
        message = edit_on_page(page, entity, text, image)
        if not message.startswith("Edited"):
            raise SystemExit(f"error: the edit did not happen: {message}")
        page.locator("#result img").first.wait_for()
        page.wait_for_timeout(500)  # the images' fade-in
        box = page.locator("#result").bounding_box()
        clip = {"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"] + 16}
        return message, page.screenshot(full_page=True, clip=clip)
    finally:
        page.close()


def screenshot(
    cfg: Any,
    out: str | os.PathLike,
    width: int = 960,
    chromium: str | None = None,
    context: Any = None,
    example: int = 0,
) -> dict[str, Any]:
    """Serve the app of `cfg`, edit its ShapesWorld example number `example` (0: the first) in
    Chromium (a new one, or the playwright browser `context` given) and save the page down to
    the result as `out`; returns the example, the message and the file's size. SystemExit when
    something is missing or the edit did not happen."""
    from semani.app import launch, shapes_examples

    executable = find_chromium(chromium)
    if executable is None and context is None:
        raise SystemExit("error: no Chromium: apt-get install chromium (or --chromium <binary>)")
    examples = shapes_examples(cfg.shapes.examples_dir, example + 1)[example:]
    if not examples:
        raise SystemExit(
            f"error: no ShapesWorld test images in {cfg.shapes.examples_dir}: python "
            "scripts/make_shapes.py --out data/shapes --n-train 2000 --n-test 200 --size 64"
        )
    image, entity, text = examples[0]
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network
    demo = launch(cfg, prevent_thread_lock=True, quiet=True)
    try:
        if context is not None:
            message, png = _capture(context, demo.local_url, image, entity, text)
        else:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
                context = open_chromium(p, executable, profile)
                try:
                    message, png = _capture(context, demo.local_url, image, entity, text)
                finally:
                    context.close()
    finally:
        demo.close()
    out = Path(out)
    size = save_small(png, out, width)
    log.info("%s: %d bytes (%s -> %r: %s)", out, size, entity, text, message)
    return {"image": image, "entity": entity, "text": text, "message": message, "bytes": size}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/app_screenshot.png"))
    parser.add_argument("--width", type=int, default=960, help="the saved image's width (px)")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: PATH)")
    parser.add_argument("--example", type=int, default=0,
                        help="which ShapesWorld test image (0: the first)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="configs/app.yaml overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    screenshot(
        compose_app(args.overrides), args.out, args.width, args.chromium, example=args.example
    )


if __name__ == "__main__":
    main()
