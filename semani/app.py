"""`python -m semani.app`: the Gradio demo of entity-level editing (paper §4.5; configs/app.yaml).

    python -m semani.app method=semani_diff editor.source=<diffusers inpainting folder> \
        alignment/segmenter=mask2former server_port=7860

Upload an image, type the word naming the entity and the target text (or, with no word,
several edits "bird: a blue bird | branch: a snowy branch"), set the sampler's steps and
guidance, the seed and the selection threshold. Each request runs `semani.EntityEditPipeline`
(the path of `manipulate.py`), built once at start from the `method` configuration, and shows:

- the entity proposals over the image, each labelled with its similarity to the word, and a
  table of every proposal (similarity per word, which were chosen, segmenter score, area);
- the chosen mask (white = edited) and the result, both at the input's size, side by side;
- one message: what was done, or why not (an entity that is not found lists the best proposals
  and their similarities; an unreadable image; an empty text; ...), never a traceback and never
  a server path (the upload is named by its file name).

Limits (`semani.app_limits`, configs/app.yaml): gradio refuses uploads over `max_file_size`; an
image over `max_pixels` is refused from its header before it is decoded; one whose longer side
is over `max_side` is edited on a resized copy (the proposals are shown on it) and the result is
resized back and pasted into the upload inside the chosen mask; every argument is checked on the
server against `bounds` (an `error:` message, never a silently replaced value).

Models (`load_models`): the configured method's pipeline; when its weights are missing (the
method's `weights` list) or it fails to load (a corrupt or refused checkpoint: the notice names
the file), the ShapesWorld models of `cfg.shapes`; when those are missing too, the app starts
anyway and names the missing files and the commands that make them. The ShapesWorld test images
are offered as examples whenever they exist (`cfg.shapes.examples_dir`), whichever models load.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from semani.alignment.types import EntityNotFoundError, EntityProposals
from semani.app_limits import (
    Limits,
    Request,
    check_upload,
    paste_back,
    public_message,
    working_copy,
)
from semani.pipeline import EntityEditPipeline, plan_edits
from semani.utils.errors import USER_ERRORS, one_line
from semani.utils.image_io import read_image
from semani.utils.task_utils import extras
from semani.utils.weights import missing_weights

log = logging.getLogger(__name__)

__all__ = [
    "EditOutputs",
    "Models",
    "build_app",
    "launch",
    "load_models",
    "main",
    "run_edit",
    "shapes_pipeline",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# the table's columns before any proposal
EMPTY_TABLE = ["proposal", "similarity", "chosen for", "segmenter score", "area %"]
# the limits of configs/app.yaml (run_edit's default; the app passes the configured ones)
DEFAULT_LIMITS = Limits()
# the images' box (px), and small images (ShapesWorld's 64 px) scaled up to fill it, pixelated
IMAGE_HEIGHT = 320
CSS = """
#image img, #mask img, #result img { width: 100%; height: 100%; object-fit: contain;
  image-rendering: pixelated; }
#proposals img { image-rendering: pixelated; }
"""
# proposal colours in the overlay (matplotlib's tab10)
PALETTE = "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #7f7f7f #bcbd22 #17becf".split()


class MissingWeightsError(FileNotFoundError):
    """Weight files a model configuration names do not exist."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        super().__init__("missing " + ", ".join(files))


@dataclass
class Models:
    """What the app edits with: the pipeline (None when nothing loads), which set it is
    ("configured", "ShapesWorld" or "none"), a Markdown notice for the page (why the fallback,
    or what is missing) and example rows [image, entity, text] (ShapesWorld test images, with
    whichever models load)."""

    pipeline: EntityEditPipeline | None = None
    kind: str = "none"
    notice: str = ""
    examples: list[list[str]] = field(default_factory=list)


@dataclass
class EditOutputs:
    """One request's outputs: the message, the input with its proposals as
    (image, [((H, W) float mask, label)]), the score table, the chosen mask (L, 0/255) and the
    result (RGB, the input's size); images are None where the request stopped before them."""

    message: str
    proposals: tuple[Image.Image, list[tuple[np.ndarray, str]]] | None = None
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    mask: Image.Image | None = None
    result: Image.Image | None = None


# ---------------------------------------------------------------------------------------------
# models


def _build(cfg: DictConfig) -> EntityEditPipeline:
    """The pipeline of a node with `editor`, `alignment` and `weights` (missing files first)."""
    missing = missing_weights(cfg)
    if missing:
        raise MissingWeightsError([m.path or f"{m.key} (not set)" for m in missing])
    return EntityEditPipeline.from_config(cfg)


def _shapes_config(cfg: DictConfig) -> DictConfig:
    """The ShapesWorld fallback as a pipeline config: `cfg.shapes.editor`, `cfg.alignment` with
    the segmenter and scorer of `cfg.shapes.alignment` (whole nodes), `cfg.shapes.weights`."""
    alignment = OmegaConf.to_container(cfg.alignment, resolve=True)
    alignment.update(OmegaConf.to_container(cfg.shapes.alignment, resolve=True))
    return OmegaConf.create(
        {
            "editor": OmegaConf.to_container(cfg.shapes.editor, resolve=True),
            "alignment": alignment,
            "weights": OmegaConf.to_container(cfg.shapes.weights, resolve=True),
        }
    )


def shapes_pipeline(cfg: DictConfig) -> EntityEditPipeline:
    """The ShapesWorld fallback's pipeline (`cfg.shapes`, with `cfg.alignment`'s rule): what
    the app uses when the configured models cannot be loaded."""
    return _build(_shapes_config(cfg))


def _reason(err: BaseException) -> str:
    if isinstance(err, MissingWeightsError):
        return "missing " + ", ".join(f"`{f}`" for f in err.files)
    return f"`{one_line(err)}`"


def load_models(cfg: DictConfig) -> Models:
    """The configured pipeline, else the ShapesWorld one (`cfg.shapes`), else none; the notice
    says which and why (see the module docstring)."""
    examples = shapes_examples(cfg.shapes.examples_dir, int(cfg.shapes.num_examples))
    try:
        return Models(_build(cfg), "configured", examples=examples)
    except USER_ERRORS as err:
        configured = err
        log.warning("the configured models cannot be loaded: %s", one_line(err))
        log.debug("configured models", exc_info=True)
    notice = f"The configured models cannot be loaded: {_reason(configured)}."
    if not cfg.shapes.enabled:
        return Models(notice=f"**No models loaded.** {notice}")
    try:
        pipeline = shapes_pipeline(cfg)
    except USER_ERRORS as err:
        log.warning("the ShapesWorld models cannot be loaded either: %s", one_line(err))
        log.debug("ShapesWorld models", exc_info=True)
        commands = "\n".join(str(c) for c in cfg.shapes.commands)
        return Models(
            notice=(
                f"**No models loaded.** {notice} Nor the ShapesWorld models: {_reason(err)}. "
                f'Pass your own weights (e.g. `editor.source=...`; README, "Pretrained weights") '
                f"or make the ShapesWorld ones:\n\n```bash\n{commands}\n```"
            )
        )
    log.info("using the ShapesWorld models")
    notice += " Using the ShapesWorld models instead (64 px shapes; try the examples below)."
    return Models(pipeline, "ShapesWorld", notice, examples)


def shapes_examples(root: str | os.PathLike, n: int) -> list[list[str]]:
    """[image path, entity, text] for the first `n` ShapesWorld test images: each image's first
    entity, recoloured ("circle" -> "a blue circle"); [] when there is no ShapesWorld at `root`."""
    from semani.data.base import load_filenames
    from semani.data.shapes_generator import COLORS, with_article

    root = Path(root)
    try:
        keys = load_filenames(root / "test" / "filenames.pickle")[:n]
        rows = []
        for key in keys:
            entity = json.loads((root / "entities" / f"{key}.json").read_text())["entities"][0]
            colours = list(COLORS)
            new = colours[(colours.index(entity["color"]) + 1) % len(colours)]
            image = root / "CUB_200_2011" / "images" / f"{key}.png"
            rows.append([str(image), entity["name"], with_article(f"{new} {entity['name']}")])
        return rows
    except (OSError, ValueError, KeyError, IndexError) as err:
        log.info("no ShapesWorld examples from %s: %s", root, one_line(err))
        return []


# ---------------------------------------------------------------------------------------------
# one request


def _with_selection(
    pipeline: EntityEditPipeline, threshold: float | None, strict: bool, select: str | int = "best"
) -> EntityEditPipeline:
    """A shallow copy of `pipeline` (same models) whose aligner has this request's selection
    rule: a threshold turns on threshold selection; strict makes a word below it not found;
    select picks the instance (best, all at or above the threshold, or the k-th best)."""
    aligner = copy.copy(pipeline.aligner)
    aligner.pick = select
    if threshold is not None:
        aligner.selection, aligner.threshold = "threshold", float(threshold)
    aligner.threshold_mode = "strict" if strict else "keep_best"
    if (strict or select == "all") and aligner.threshold is None:
        what = "strict" if strict else "select=all"
        raise ValueError(f"{what} needs a threshold: {type(aligner.scorer).__name__} has none")
    return EntityEditPipeline(aligner, pipeline.editor)


def _sampler(
    pipeline: EntityEditPipeline, steps: int | None, guidance: float | None
) -> dict[str, Any]:
    """The `steps=` / `guidance_scale=` the editor takes (SeMani-Trans takes neither)."""
    given = {
        "steps": None if steps is None else int(steps),
        "guidance_scale": None if guidance is None else float(guidance),
    }
    options = pipeline.sampler_options
    return {k: v for k, v in given.items() if k in options and v is not None}


def _fmt(sim: float) -> str:
    return "n/a" if sim != sim else f"{sim:.3f}"


def proposal_views(
    image: Image.Image,
    proposals: EntityProposals,
    sims: dict[str, list[float]],
    chosen: dict[str, list[int]],
) -> tuple[tuple[Image.Image, list[tuple[np.ndarray, str]]], list[str], list[list[Any]]]:
    """The annotated image (one labelled mask per proposal) and the table (headers, rows) of
    every proposal: similarity per word, the words it was chosen for, segmenter score, area."""
    masks = proposals.masks.cpu().numpy()  # (K, H, W) bool
    words = list(sims)
    annotations, rows = [], []
    for i in range(len(proposals)):
        mine = [w for w in words if i in chosen.get(w, [])]
        scores = ", ".join(
            (f"{w} " if len(words) > 1 else "") + _fmt(sims[w][i]) + (" ✓" if w in mine else "")
            for w in words
        )
        label = f"#{i}: {scores}" if scores else f"#{i}"
        annotations.append((masks[i].astype(np.float32), label))
        rows.append(
            [
                f"#{i}",
                *(round(sims[w][i], 4) if sims[w][i] == sims[w][i] else None for w in words),
                ", ".join(mine),
                round(float(proposals.scores[i]), 4),
                round(100 * float(masks[i].mean()), 1),
            ]
        )
    headers = [
        "proposal",
        *(f"similarity to {w!r}" for w in words),
        "chosen for",
        "segmenter score",
        "area %",
    ]
    return (image, annotations), headers, rows


def picked_proposal(index: Any) -> str:
    """The `select` value of a click on a proposal: gradio's `SelectData.index` of the
    annotated image (the annotation's index) or of the table ([row, column])."""
    if isinstance(index, (list, tuple)):
        index = index[0]
    return f"#{int(index)}"


def _upload_path(image: Any) -> str | None:
    """The uploaded file's path from gradio's payload (a FileData dict) or a path."""
    if isinstance(image, dict):
        return image.get("path")
    return None if image is None else str(image)


def run_edit(
    models: Models,
    image: Any,
    entity: str | None,
    text: str | None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    threshold: float | str | None = None,
    strict: bool = False,
    select: str | int | None = "best",
    limits: Limits = DEFAULT_LIMITS,
) -> EditOutputs:
    """Find the entity `entity` names in `image` (a path) and re-paint it after `text` (see the
    module docstring). Every argument is checked against `limits` first (steps / guidance None:
    the editor's own; threshold None or blank: the scorer's rule); every expected failure
    becomes the message, which names the upload by its file name only."""
    if models.pipeline is None:
        return EditOutputs(models.notice or "no models loaded")
    path = _upload_path(image)
    if not path:
        return EditOutputs("Upload an image first.")
    try:
        request = limits.check(entity, text, steps, guidance, seed, threshold, strict, select)
    except ValueError as err:  # an argument out of range or of the wrong type
        return EditOutputs(public_message(f"error: {one_line(err)}", path))
    out = _edit(models.pipeline, path, request, limits)
    out.message = public_message(out.message, path)
    return out


def _edit(
    pipeline: EntityEditPipeline, path: str, request: Request, limits: Limits
) -> EditOutputs:
    """One checked request on the upload at `path` (a working copy when it is over
    `limits.max_side`)."""
    proposals, word_sims, chosen = None, {}, {}
    source = None
    try:
        check_upload(path, limits)  # bytes, then pixels from the header: before decoding
        original = read_image(path)
        source = working_copy(original, limits.max_side)
        pipeline = _with_selection(pipeline, request.threshold, request.strict, request.select)
        plan = plan_edits(request.text, request.entity, has_mask=False)  # before proposing
        # a text-conditioned segmenter proposes per word: the gallery shows the first word's
        words = {word for word, _ in plan}
        proposals = pipeline.propose(source, word=plan[0][0])
        shared = not pipeline.text_conditioned or len(words) == 1
        result = pipeline(
            source,
            request.text,
            entity=request.entity,
            seed=request.seed,
            proposals=proposals if shared else None,
            **_sampler(pipeline, request.steps, request.guidance),
        )
    except EntityNotFoundError as err:
        if proposals is not None:
            word_sims[err.word] = [float("nan")] * len(proposals)
            for i, sim in err.ranking:
                word_sims[err.word][i] = sim
        return _outputs(f"error: {one_line(err)}", source, proposals, word_sims, chosen)
    except USER_ERRORS as err:
        log.debug("request failed", exc_info=True)
        return _outputs(f"error: {one_line(err)}", source, proposals, word_sims, chosen)
    for e in result.edits:
        if not shared and e.word != plan[0][0]:
            continue  # ranked among its own proposals, not the gallery's
        word_sims[e.word] = e.alignment.similarities.tolist()
        chosen.setdefault(e.word, []).extend(e.alignment.chosen)
    picked = "; ".join(
        f"{e.word!r} -> " + ", ".join(f"#{i}" for i in e.alignment.chosen) for e in result.edits
    )
    edited, mask, scaled = result.image, result.mask, ""
    if source is not original:  # edited at max_side: back to the upload's size
        edited, mask = paste_back(original, result.image, result.mask)
        scaled = (
            f" Edited at {source.width}x{source.height} (max_side {limits.max_side}) and "
            f"pasted into the {original.width}x{original.height} upload."
        )
    n = len(result.edits)
    out = _outputs(
        f"Edited {n} entit{'y' if n == 1 else 'ies'} ({picked}), "
        f"{100 * mask.mean():.1f}% of the image.{scaled}",
        source,
        proposals,
        word_sims,
        chosen,
    )
    out.mask = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    out.result = edited
    return out


def _outputs(
    message: str,
    source: Image.Image | None,
    proposals: EntityProposals | None,
    sims: dict[str, list[float]],
    chosen: dict[str, list[int]],
) -> EditOutputs:
    out = EditOutputs(message)
    if source is not None and proposals is not None:
        out.proposals, out.headers, out.rows = proposal_views(source, proposals, sims, chosen)
    return out


# ---------------------------------------------------------------------------------------------
# the page


def build_app(cfg: DictConfig, models: Models) -> Any:
    """The `gr.Blocks` page on `models`; its edit is also the API endpoint "/edit" (inputs:
    image, entity, text, steps, guidance, seed, threshold, strict, select), checked against the
    config's limits (`Limits.from_config`) whichever way it is called."""
    import gradio as gr
    import pandas as pd

    pipeline = models.pipeline
    editor = pipeline.editor if pipeline is not None else None
    options = pipeline.sampler_options if pipeline is not None else ()
    limits = Limits.from_config(cfg)

    def edit(image, entity, text, steps, guidance, seed, threshold, strict, select):
        args = (image, entity, text, steps, guidance, seed, threshold, strict, select)
        try:
            out = run_edit(models, *args, limits=limits)
        except Exception as err:  # a bug, out of memory, ...: one line here, the traceback logged
            log.exception("edit failed")
            message = f"error: {one_line(err)} (the traceback is in the log)"
            out = EditOutputs(public_message(message, _upload_path(image)))
        colours = {
            label: PALETTE[i % len(PALETTE)]
            for i, (_, label) in enumerate(out.proposals[1] if out.proposals else [])
        }
        return (
            out.message,
            gr.AnnotatedImage(value=out.proposals, color_map=colours),
            pd.DataFrame(out.rows, columns=out.headers or EMPTY_TABLE),
            out.mask,
            out.result,
        )

    with gr.Blocks(title="SeMani") as demo:
        gr.Markdown(
            "## SeMani: entity-level text-guided image manipulation\n"
            "Name the entity to edit (the alignment phase finds it among the segmenter's "
            "proposals) and describe what it should become. "
            + (f"Models: **{models.kind}** ({type(editor).__name__}). " if editor else "")
            + limits.describe()
        )
        if models.notice:
            gr.Markdown(models.notice)
        with gr.Row():
            with gr.Column():
                # type="filepath", image_mode=None: the upload's own file reaches read_image
                # (EXIF orientation, transparency on white, 16-bit), as in manipulate.py
                image = gr.Image(
                    label="image",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    format="png",
                    height=IMAGE_HEIGHT,
                    elem_id="image",
                )
                entity = gr.Textbox(
                    label="entity",
                    placeholder="bird",
                    info="the word naming the entity; empty: text is 'word: text | word: text'",
                    max_length=limits.entity_chars,
                    elem_id="entity",
                )
                text = gr.Textbox(
                    label="text",
                    placeholder="a blue bird with a red crown",
                    max_length=limits.text_chars,
                    elem_id="text",
                )
                with gr.Row():
                    steps = gr.Slider(
                        *limits.steps,
                        value=limits.start("steps", getattr(editor, "steps", 50) or 50),
                        step=1,
                        label="steps",
                        visible="steps" in options,
                    )
                    guidance = gr.Slider(
                        *limits.guidance,
                        value=limits.start("guidance", getattr(editor, "guidance_scale", 7.5)),
                        step=0.5,
                        label="guidance",
                        visible="guidance_scale" in options,
                    )
                with gr.Row():
                    seed = gr.Number(
                        value=cfg.get("seed", 0),
                        precision=0,
                        minimum=limits.seed[0],
                        maximum=limits.seed[1],
                        label="seed",
                    )
                    # a Textbox: a gr.Number shows (and sends) 0 when it has no value
                    threshold = gr.Textbox(
                        value="",
                        label="threshold",
                        placeholder="empty",
                        info="empty: the scorer's rule; a number from "
                        f"{limits.threshold[0]:g} to {limits.threshold[1]:g}: the best proposal "
                        "and every other at or above it",
                        max_length=32,
                        elem_id="threshold",
                    )
                    strict = gr.Checkbox(
                        value=cfg.alignment.threshold_mode == "strict",
                        label="strict",
                        info="none reaches the threshold: not found",
                    )
                    select = gr.Textbox(
                        value="best",
                        label="select",
                        info="best: the rule's pick; all: every proposal at or above the "
                        "threshold; 2: the second best (the next bird); #3: proposal 3 "
                        "(click it in the image or the table)",
                        max_length=8,
                        elem_id="select",
                    )
                button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                proposals = gr.AnnotatedImage(
                    label="entity proposals: similarity to the word (✓ chosen)",
                    format="png",
                    elem_id="proposals",
                )
                table = gr.Dataframe(
                    value=pd.DataFrame(columns=EMPTY_TABLE),
                    label="proposals",
                    interactive=False,
                    elem_id="table",
                )
        with gr.Row():
            mask = gr.Image(
                label="chosen mask (white = edited)",
                format="png",
                interactive=False,
                height=IMAGE_HEIGHT,
                elem_id="mask",
            )
            result = gr.Image(
                label="result",
                format="png",
                interactive=False,
                height=IMAGE_HEIGHT,
                elem_id="result",
            )

        def pick(evt: gr.SelectData) -> str:  # a clicked proposal is the next edit's select
            return picked_proposal(evt.index)

        pick.__annotations__["evt"] = gr.SelectData  # a class, not a string: gradio injects it
        proposals.select(pick, None, select)
        table.select(pick, None, select)
        if models.examples:
            gr.Examples(
                models.examples,
                inputs=[image, entity, text],
                label="ShapesWorld examples (test images, 64 px)",
            )
        # preprocess=False: the image arrives as gradio's file payload, so an unreadable upload
        # is read_image's message, not gradio's generic error (the upload is still checked)
        button.click(
            edit,
            inputs=[image, entity, text, steps, guidance, seed, threshold, strict, select],
            outputs=[message, proposals, table, mask, result],
            api_name="edit",
            preprocess=False,
        )
    return demo


def launch(cfg: DictConfig, **kwargs: Any) -> Any:
    """Load the models, build the page and serve it (`cfg.server_name`, `server_port`,
    `share`, `max_file_size`; `kwargs` go to `gr.Blocks.launch`, e.g.
    `prevent_thread_lock=True`)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('error: the app needs gradio: pip install -e ".[app]"') from None
    extras(cfg)
    limits = Limits.from_config(cfg)  # a bad max_file_size stops here, before loading
    models = load_models(cfg)
    demo = build_app(cfg, models)
    kwargs.setdefault("max_file_size", limits.max_file_size)
    kwargs.setdefault("css", CSS)
    demo.launch(
        server_name=cfg.server_name, server_port=cfg.server_port, share=cfg.share, **kwargs
    )
    return demo


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="app")
def main(cfg: DictConfig) -> None:
    """`python -m semani.app [overrides]`: serve the app until interrupted."""
    launch(cfg)


if __name__ == "__main__":
    main()
