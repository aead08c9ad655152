"""The entity prompt word of each Table-I case (SPEC "Evaluation protocol (Table I)").

- ``fixed``: the same word for every image ("bird" on CUB, "flower" on Oxford);
- ``entity``: a seeded pick among the image's entity names (ShapesWorld: the shapes it holds);
- ``caption``: COCO, "a noun from the image's own caption (so the entity exists)": a seeded pick
  among the COCO entity words found in the image's captions (`caption_entity_words`), e.g.
  "a man riding a horse on a beach" -> "man" (person) or "horse".

`COCO_WORDS` maps the singular words (and two-word names) a caption uses for an object to its
COCO category (the 80 instance categories, plus common caption synonyms such as "man" ->
person, "bike" -> bicycle, "table" -> dining table); plurals are matched too ("dogs" -> "dog").
The prompt word is the singular caption word itself, so "a photo of a {word}." reads well.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["COCO_WORDS", "WORD_SOURCES", "caption_entity_words", "pick_word"]

WORD_SOURCES = ("fixed", "entity", "caption")

_CATEGORIES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
)
COCO_CATEGORIES = tuple(c.replace("_", " ") for c in _CATEGORIES.split())
_SYNONYMS = {
    "person": "man woman boy girl child kid baby guy lady person player skier surfer "
    "skateboarder snowboarder rider batter pitcher catcher",
    "bicycle": "bike",
    "motorcycle": "motorbike scooter",
    "airplane": "plane jet airliner aeroplane",
    "boat": "ship sailboat canoe kayak",
    "cow": "cattle bull calf",
    "sheep": "lamb",
    "dog": "puppy",
    "cat": "kitten",
    "bird": "pigeon seagull duck goose",
    "handbag": "purse bag",
    "suitcase": "luggage",
    "skis": "ski",
    "sports ball": "ball soccer_ball football baseball tennis_ball",
    "baseball bat": "bat",
    "baseball glove": "glove mitt",
    "tennis racket": "racket racquet",
    "cup": "mug",
    "donut": "doughnut",
    "hot dog": "hotdog",
    "couch": "sofa",
    "potted plant": "plant houseplant",
    "dining table": "table",
    "tv": "television",
    "laptop": "computer",
    "cell phone": "phone cellphone smartphone",
    "refrigerator": "fridge",
    "teddy bear": "teddy",
    "hair drier": "hair_dryer",
}
# "orange" is left out (mostly a colour in captions); "skis" is matched as "ski"
COCO_WORDS: dict[str, str] = {c: c for c in COCO_CATEGORIES if c not in ("orange", "skis")}
COCO_WORDS.update(
    {w.replace("_", " "): cat for cat, words in _SYNONYMS.items() for w in words.split()}
)
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person",
              "mice": "mouse", "knives": "knife", "geese": "goose", "skis": "ski",
              "benches": "bench", "buses": "bus", "sandwiches": "sandwich",
              "couches": "couch"}  # fmt: skip
_WORD = re.compile(r"[a-z]+")


def _singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and word[:-3] + "y" in COCO_WORDS:
        return word[:-3] + "y"
    if word.endswith("s") and word[:-1] in COCO_WORDS:
        return word[:-1]
    return word


def caption_entity_words(caption: str) -> list[tuple[str, str]]:
    """(prompt word, COCO category) of every entity word of `caption`, in order, without
    repeats; two-word names first ("a hot dog" -> ("hot dog", "hot dog"), not "dog")."""
    tokens = [_singular(t) for t in _WORD.findall(caption.lower())]
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        word = pair if i + 1 < len(tokens) and pair in COCO_WORDS else tokens[i]
        if word in COCO_WORDS and all(w != word for w, _ in out):
            out.append((word, COCO_WORDS[word]))
        i += 2 if word == pair and " " in word else 1
    return out


def pick_word(
    source: str,
    rng: np.random.Generator,
    word: str | None = None,
    captions: Sequence[str] = (),
    entity_names: Callable[[], Sequence[str]] | None = None,
) -> str | None:
    """The prompt word of one image by `source` (see the module docstring), drawn with `rng`;
    None when the image has no candidate (an image without entities or entity words)."""
    if source == "fixed":
        if not word:
            raise ValueError("table1.word_from=fixed needs table1.word (e.g. bird)")
        return str(word)
    if source == "entity":
        if entity_names is None:
            raise ValueError("table1.word_from=entity needs a data set with entity_names")
        names = list(dict.fromkeys(entity_names()))  # distinct, in the data set's order
    elif source == "caption":
        names = list(dict.fromkeys(w for c in captions for w, _ in caption_entity_words(c)))
    else:
        raise ValueError(f"table1.word_from must be one of {WORD_SOURCES}, got {source!r}")
    return str(names[int(rng.integers(len(names)))]) if names else None
