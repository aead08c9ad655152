"""ShapesWorld generator: a synthetic caption + entity-mask data set in CUB's layout.

Each image holds 1-3 flat-coloured shapes (circle, square, triangle, star, hexagon, diamond,
cross; distinct kinds and colours within an image; three sizes; possibly overlapping) on a solid,
gradient or noisy background. Ten captions per image describe every shape by colour (and often
size) and, with several shapes, their relative positions ("a red circle above a small blue square
on a gray background"). Shapes are drawn without anti-aliasing, so every pixel of an entity's
visible mask has exactly the entity's colour.

Make it with ``python scripts/make_shapes.py --out data/shapes --n-train 2000 --n-test 200
--size 64 --seed 0`` (about a second per thousand 64 px images). The same arguments give the same
bytes. Read it with ``semani.data.shapes.ShapesWorldDataset``: the CUB reader plus entity masks
and names.
Layout (CUB's; the "bird box" is the whole image, so the AttnGAN crop keeps the whole image)::

    shapes/
      CUB_200_2011/images.txt              "<id> <class>/<img>.png"
      CUB_200_2011/bounding_boxes.txt      "<id> 0.0 0.0 <size> <size>"
      CUB_200_2011/images/<class>/<img>.png   (lossless; class = "NNN.<shape of entity A>")
      text/<class>/<img>.txt               10 captions, one per line
      train/filenames.pickle, test/filenames.pickle   lists of "<class>/<img>" keys
      masks/<class>/<img>_<k>.png          entity k's VISIBLE pixels (after occlusion), 0/255
      entities/<class>/<img>.json          see below
      shapesworld.json                     generator arguments and vocabularies

``entities/<key>.json``: ``{"image": <path>, "size": [W, H], "background": {"kind", "colors",
"phrase", ...}, "entities": [{"name": "circle" (the prompt word), "description": "small red
circle", "color", "rgb", "size", "center" [x, y] (visible centroid), "bbox" [x1, y1, x2, y2],
"area" (visible pixels), "location" ("top left", ... or null near a third's border), "mask"}],
"relations": [{"subject": k, "relation": "above"|"below"|"left of"|"right of", "object": j}]}``.
Entities are listed in painting order (later ones occlude earlier ones); every relation used in
a caption is in ``relations`` and holds for the visible centroids with a clear margin.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

__all__ = [
    "drop_entity_colours",
    "generate_shapes",
    "make_scene",
    "noun_phrase",
    "with_article",
    "SHAPES",
    "COLORS",
    "RELATIONS",
    "SIZE_WORDS",
    "SIZE_WORD_PROB",
]

VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 75, 215),
    "purple": (135, 50, 190),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "light gray": (200, 200, 200),
    "dark gray": (65, 65, 65),
    "beige": (225, 210, 175),
    "light blue": (170, 200, 235),
    "navy": (25, 30, 80),
    "dark green": (30, 70, 45),
    "white": (250, 250, 250),
    "black": (8, 8, 8),
}
SIZES = {"small": (0.10, 0.13), "medium": (0.15, 0.18), "large": (0.20, 0.24)}  # half-extent/size
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized",), "large": ("large", "big")}
SIZE_WORD_PROB = 0.5  # how often a caption names an entity's size
RELATIONS = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
LOCATIONS = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
MIN_COLOR_DIST = 110.0  # RGB distance between an entity colour and any background colour
MIN_VISIBLE = 0.7  # an entity keeps at least this fraction of its area after occlusion
REL_MARGIN = 0.15  # relation axis offset >= this fraction of the image size ...
REL_RATIO = 1.5  # ... and >= this times the offset on the other axis
N_CAPTIONS = 10


# -- geometry -------------------------------------------------------------------------------------
def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of half-extent ``r`` centred on (cx, cy) (y grows downwards)."""

    def ring(n: int, radii: Sequence[float], start: float) -> list[tuple[float, float]]:
        a = start + np.arange(n) * 2 * np.pi / n
        rr = np.resize(np.asarray(radii, dtype=float), n)
        return list(zip((cx + rr * np.cos(a)).tolist(), (cy + rr * np.sin(a)).tolist()))

    if kind == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":  # apex up, bounding box centred, about equilateral
        return [
            (cx, cy - 0.95 * r),
            (cx + 1.05 * r, cy + 0.85 * r),
            (cx - 1.05 * r, cy + 0.85 * r),
        ]
    if kind == "star":
        return ring(10, [1.05 * r, 0.45 * r], -np.pi / 2)
    if kind == "hexagon":
        return ring(6, [r], 0.0)
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if kind == "cross":
        a = 0.34 * r
        pts = [(a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r)]
        pts += [(-x, -y) for x, y in pts]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {kind!r}")


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """(size, size) bool mask of one shape, no anti-aliasing."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=255)
    return np.asarray(canvas) > 0


def _segment_distance(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from colour ``c`` to the RGB segment a-b (a gradient's colours)."""
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(c - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


@functools.cache
def _allowed_colors(bg_start: str, bg_end: str) -> list[str]:
    """Entity colours at least ``MIN_COLOR_DIST`` from every colour of the background."""
    a, b = (np.asarray(BACKGROUNDS[c], dtype=float) for c in (bg_start, bg_end))
    return [
        c
        for c, v in COLORS.items()
        if _segment_distance(np.asarray(v, dtype=float), a, b) >= MIN_COLOR_DIST
    ]


@functools.lru_cache(maxsize=8)
def _ramps(size: int) -> dict[str, np.ndarray]:
    """(size, size) gradient ramps in [0, 1] per direction."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    return {"vertical": yy, "horizontal": xx, "diagonal": (xx + yy) / 2}


# -- scene sampling -------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(size, size, 3) float background and its description."""
    names = list(BACKGROUNDS)
    kind = str(rng.choice(["solid", "solid", "gradient", "noise"]))
    c1 = str(rng.choice(names))
    base = np.asarray(BACKGROUNDS[c1], dtype=np.float32)
    if kind == "gradient":
        c2 = str(rng.choice([n for n in names if n != c1]))
        direction = str(rng.choice(["vertical", "horizontal", "diagonal"]))
        t = _ramps(size)[direction]
        end = np.asarray(BACKGROUNDS[c2], dtype=np.float32)
        arr = base + t[..., None] * (end - base)
        desc = {"kind": kind, "colors": [c1, c2], "direction": direction}
        phrases = [f"{c1}-to-{c2} gradient", f"{c1} and {c2} gradient"]
    elif kind == "noise":
        arr = base + rng.normal(0.0, 14.0, (size, size, 3)).astype(np.float32)
        desc = {"kind": kind, "colors": [c1]}
        phrases = [f"noisy {c1}", f"grainy {c1}"]
    else:
        arr = np.broadcast_to(base, (size, size, 3)).copy()
        desc = {"kind": kind, "colors": [c1]}
        phrases = [c1, f"plain {c1}"]
    desc["phrase"] = phrases[0]
    desc["phrases"] = phrases
    return np.clip(arr, 0, 255), desc


def _location(cx: float, cy: float, size: int) -> str | None:
    """Image third of a point ("top left", ..., "centre"); None within 3% of a third's border."""

    def third(v: float, words: tuple[str, str, str]) -> str | None:
        f = v / size
        for k, (lo, hi) in enumerate([(-1, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 2)]):
            if lo + 0.03 <= f <= hi - 0.03:
                return words[k]
        return None

    col, row = third(cx, ("left", "", "right")), third(cy, ("top", "", "bottom"))
    if col is None or row is None:
        return None
    return f"{row} {col}".strip() or "centre"


def _relation(a: dict[str, Any], b: dict[str, Any], size: int) -> str | None:
    """Position of entity a relative to b from visible centroids; None if not clear."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if big < REL_MARGIN * size or big < REL_RATIO * small:
        return None
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _sample_scene(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Background + 1-3 entities with visible masks, roles (A, B, C) and clear relations."""
    bg, bg_desc = _background(rng, size)
    allowed = _allowed_colors(bg_desc["colors"][0], bg_desc["colors"][-1])
    while True:
        n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
        kinds = [str(k) for k in rng.choice(SHAPES, n, replace=False)]
        colors = [str(c) for c in rng.choice(allowed, n, replace=False)]
        sizes = [str(s) for s in rng.choice(list(SIZES), n)]
        roles = [int(k) for k in rng.permutation(n)]  # entity indices playing A, B, C
        for _ in range(50):
            ents, full = [], []
            for k in range(n):
                r = float(rng.uniform(*SIZES[sizes[k]])) * size
                cx, cy = rng.uniform(r + 1, size - r - 1, 2)
                full.append(_shape_mask(kinds[k], float(cx), float(cy), r, size))
            visible, covered = [None] * n, np.zeros((size, size), bool)
            for k in reversed(range(n)):  # later entities are painted on top
                visible[k] = full[k] & ~covered
                covered |= full[k]
            if any(v.sum() < MIN_VISIBLE * f.sum() or not v.any() for v, f in zip(visible, full)):
                continue
            for k in range(n):
                ys, xs = np.nonzero(visible[k])
                cx, cy = float(xs.mean()), float(ys.mean())
                ents.append(
                    {
                        "name": kinds[k],
                        "color": colors[k],
                        "rgb": list(COLORS[colors[k]]),
                        "size": sizes[k],
                        "description": f"{sizes[k]} {colors[k]} {kinds[k]}",
                        "center": [round(cx, 2), round(cy, 2)],
                        "bbox": [
                            int(xs.min()),
                            int(ys.min()),
                            int(xs.max()) + 1,
                            int(ys.max()) + 1,
                        ],
                        "area": int(visible[k].sum()),
                        "location": _location(cx, cy, size),
                    }
                )
            pairs = [(roles[0], roles[1])] if n > 1 else []
            if n == 3:
                pairs.append((roles[2], roles[1]))
            rels = [_relation(ents[s], ents[o], size) for s, o in pairs]
            if any(r is None for r in rels):
                continue
            image = bg.copy()
            for k in range(n):
                image[visible[k]] = COLORS[colors[k]]
            return {
                "image": image.round().astype(np.uint8),
                "masks": visible,
                "background": bg_desc,
                "entities": ents,
                "roles": roles,
                "relations": [
                    {"subject": s, "relation": r, "object": o} for (s, o), r in zip(pairs, rels)
                ],
            }


# -- captions -------------------------------------------------------------------------------------
def noun_phrase(size_word: str | None, colour: str, name: str) -> str:
    """An entity as the captions name it: "a small red circle", "an orange star"."""
    return with_article(" ".join([*([size_word] if size_word else []), colour, name]))


def with_article(phrase: str) -> str:
    """ "orange circle" -> "an orange circle", "red circle" -> "a red circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


_COLOUR_BEFORE_SHAPE = re.compile(rf"\b(?:{'|'.join(COLORS)}) (?=(?:{'|'.join(SHAPES)})\b)")
_ARTICLE = re.compile(r"\b(a|an) (\w)")


def drop_entity_colours(caption: str) -> str:
    """The caption without its entities' colour words, articles fixed: "an orange circle left of
    a small red square" -> "a circle left of a small square". Background colours stay."""
    caption = _COLOUR_BEFORE_SHAPE.sub("", caption)
    return _ARTICLE.sub(lambda m: ("an " if m[2] in "aeiou" else "a ") + m[2], caption)


def _captions(rng: np.random.Generator, scene: dict[str, Any]) -> list[str]:
    """Ten captions (distinct when the templates allow) naming every entity."""
    ents, roles, rels = scene["entities"], scene["roles"], scene["relations"]

    def pick(options: Sequence[str]) -> str:
        return str(options[int(rng.integers(len(options)))])

    def np_(k: int) -> str:  # "a small red circle" / "a red circle"
        e = ents[k]
        size_word = pick(SIZE_WORDS[e["size"]]) if rng.random() < SIZE_WORD_PROB else None
        return noun_phrase(size_word, e["color"], e["name"])

    def bg() -> str:
        return pick(scene["background"]["phrases"])

    def rel(i: int, inverse: bool = False) -> str:
        r = rels[i]["relation"]
        return pick(RELATIONS[INVERSE[r] if inverse else r])

    A = roles[0]
    if len(ents) == 1:
        loc = ents[A]["location"]
        templates = [
            lambda: np_(A),
            lambda: f"{np_(A)} on {with_article(bg())} background",
            lambda: f"there is {np_(A)} on {with_article(bg())} background",
            lambda: f"an image of {np_(A)}",
            lambda: f"{with_article(bg())} background with {np_(A)}",
            lambda: f"{np_(A)} against {with_article(bg())} background",
            lambda: f"this image shows {np_(A)}",
            lambda: f"a single {np_(A).split(' ', 1)[1]} on {with_article(bg())} background",
        ]
        if loc is not None:
            where = LOCATIONS[loc]
            templates += [
                lambda: f"{np_(A)} {where}",
                lambda: f"{np_(A)} {where} of the image",
                lambda: f"a picture of {np_(A)} {where}",
                lambda: f"{np_(A)} {where} of {with_article(bg())} background",
            ]
    elif len(ents) == 2:
        B, b = roles[1], ents[roles[1]]["name"]
        a = ents[A]["name"]
        templates = [
            lambda: f"{np_(A)} {rel(0)} {np_(B)}",
            lambda: f"{np_(B)} {rel(0, True)} {np_(A)}",
            lambda: f"{np_(A)} {rel(0)} {np_(B)} on {with_article(bg())} background",
            lambda: f"there is {np_(A)} {rel(0)} {np_(B)}",
            lambda: f"{np_(A)} and {np_(B)} on {with_article(bg())} background",
            lambda: f"{np_(B)} and {np_(A)}",
            lambda: f"an image of {np_(A)} {rel(0)} {np_(B)}",
            lambda: f"{with_article(bg())} background with {np_(A)} {rel(0)} {np_(B)}",
            lambda: f"{np_(A)} and {np_(B)}; the {a} is {rel(0)} the {b}",
            lambda: f"two shapes: {np_(B)} {rel(0, True)} {np_(A)}",
            lambda: f"{np_(A)} placed {rel(0)} {np_(B)}",
        ]
    else:
        B, C, b = roles[1], roles[2], ents[roles[1]]["name"]
        templates = [
            lambda: f"{np_(A)} {rel(0)} {np_(B)}, and {np_(C)} {rel(1)} the {b}",
            lambda: f"{np_(A)}, {np_(B)} and {np_(C)} on {with_article(bg())} background",
            lambda: f"three shapes: {np_(C)}, {np_(A)} and {np_(B)}",
            lambda: f"{np_(A)} {rel(0)} {np_(B)}; {np_(C)} is {rel(1)} the {b}",
            lambda: (
                f"there are three shapes on {with_article(bg())} background: "
                f"{np_(B)}, {np_(C)} and {np_(A)}"
            ),
            lambda: f"{np_(C)} {rel(1)} {np_(B)} and {np_(A)} {rel(0)} the {b}",
            lambda: f"{np_(B)} with {np_(A)} {rel(0)} the {b} and {np_(C)} {rel(1)} the {b}",
            lambda: f"an image of {np_(A)} {rel(0)} {np_(B)} and {np_(C)} {rel(1)} the {b}",
        ]
    caps: list[str] = []
    for _ in range(100):
        c = templates[int(rng.integers(len(templates)))]()
        if c not in caps:
            caps.append(c)
        if len(caps) == N_CAPTIONS:
            return caps
    while len(caps) < N_CAPTIONS:  # too few distinct phrasings: repeat some
        caps.append(templates[int(rng.integers(len(templates)))]())
    return caps


# -- writing --------------------------------------------------------------------------------------
def make_scene(rng: np.random.Generator, size: int) -> tuple[dict[str, Any], list[str]]:
    """One scene and its ten captions, drawn from `rng` (image `i` of `generate_shapes` is
    `make_scene(np.random.default_rng([seed, i]), size)`): the scene's `image` (H, W, 3) uint8,
    `masks` (one visible mask per entity), `entities`, `roles`, `background`, `relations`."""
    scene = _sample_scene(rng, size)
    return scene, _captions(rng, scene)


def generate_shapes(
    out: str | Path,
    n_train: int,
    n_test: int,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a ShapesWorld data set of ``n_train`` + ``n_test`` images to ``out``; returns ``out``.

    Image ``i``'s content depends only on ``(seed, i, size)``. ``overwrite`` replaces an existing
    ShapesWorld folder (a non-empty folder of anything else is never touched).
    """
    out = Path(out)
    if size < 32:
        raise ValueError(f"size must be >= 32 px for shapes to stay recognisable, got {size}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if out.exists() and any(out.iterdir()):
        if not (overwrite and (out / "shapesworld.json").is_file()):
            raise FileExistsError(
                f"{out} is not empty; pick a new folder"
                + (
                    " or pass overwrite=True (--overwrite)"
                    if (out / "shapesworld.json").is_file()
                    else ""
                )
            )
        shutil.rmtree(out)
    t0 = time.perf_counter()
    cub = out / "CUB_200_2011"
    made: set[Path] = set()
    images_txt, boxes_txt, splits = [], [], {"train": [], "test": []}
    for i in range(n_train + n_test):
        rng = np.random.default_rng([seed, i])
        scene, captions = make_scene(rng, size)
        main_kind = scene["entities"][scene["roles"][0]]["name"]
        cls = f"{SHAPES.index(main_kind) + 1:03d}.{main_kind}"
        key = f"{cls}/img_{i:05d}"
        for d in (
            cub / "images" / cls,
            out / "text" / cls,
            out / "masks" / cls,
            out / "entities" / cls,
        ):
            if d not in made:
                d.mkdir(parents=True, exist_ok=True)
                made.add(d)
        Image.fromarray(scene["image"], mode="RGB").save(cub / "images" / f"{key}.png")
        for k, m in enumerate(scene["masks"]):
            Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(
                out / "masks" / f"{key}_{k}.png"
            )
            scene["entities"][k]["mask"] = f"masks/{key}_{k}.png"
        (out / "text" / f"{key}.txt").write_text("\n".join(captions) + "\n")
        meta = {
            "image": f"CUB_200_2011/images/{key}.png",
            "size": [size, size],
            "background": scene["background"],
            "entities": scene["entities"],
            "relations": scene["relations"],
        }
        (out / "entities" / f"{key}.json").write_text(json.dumps(meta, sort_keys=True))
        images_txt.append(f"{i + 1} {key}.png")
        boxes_txt.append(f"{i + 1} 0.0 0.0 {size:.1f} {size:.1f}")
        splits["train" if i < n_train else "test"].append(key)
    (cub / "images.txt").write_text("\n".join(images_txt) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes_txt) + "\n")
    for split, keys in splits.items():
        (out / split).mkdir(exist_ok=True)
        (out / split / "filenames.pickle").write_bytes(pickle.dumps(keys, protocol=2))
    info = {
        "generator": "semani.data.shapes",  # the public module (re-exports generate_shapes)
        "version": VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
        "shapes": list(SHAPES),
        "colors": COLORS,
        "backgrounds": BACKGROUNDS,
        "relations": list(RELATIONS),
    }
    (out / "shapesworld.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    log.info(
        "wrote ShapesWorld (%d train + %d test, %d px, seed %d) to %s in %.1f s",
        n_train,
        n_test,
        size,
        seed,
        out,
        time.perf_counter() - t0,
    )
    return out
