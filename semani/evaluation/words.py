"""The entity prompt word of each Table-I case (SPEC "Evaluation protocol (Table I)").

- ``fixed``: the same word for every image ("bird" on CUB, "flower" on Oxford);
- ``entity``: a seeded pick among the image's entity names (ShapesWorld: the shapes it holds);
- ``caption``: COCO, "a noun from the image's own caption (so the entity exists)" (paper §5; its
  Fig. 7 edits "the field"): a seeded pick among the nouns of the image's captions. The nouns
  come from a part-of-speech tagger when one is installed (`NounTagger`: spaCy's English
  model, `pip install spacy && python -m spacy download en_core_web_sm`), stuff nouns ("field",
  "sky", "grass") included; without one **(assumed)** from the COCO entity vocabulary
  (`caption_entity_words`, e.g. "a man riding a horse on a beach" -> "man" (person) or
  "horse"), which never draws a stuff noun and finds no word in some captions. Every case
  records which rule gave its word (`word_rule`), and the run reports how many images each
  rule covers.

`COCO_WORDS` maps the singular words (and two-word names) a caption uses for an object to its
COCO category (the 80 instance categories, plus common caption synonyms such as "man" ->
person, "bike" -> bicycle, "table" -> dining table); plurals are matched too ("dogs" -> "dog").
The prompt word is the singular caption word itself, so "a photo of a {word}." reads well.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "COCO_WORDS",
    "NOUN_TAGGERS",
    "WORD_SOURCES",
    "NounTagger",
    "caption_entity_words",
    "load_tagger",
    "pick_word",
]

WORD_SOURCES = ("fixed", "entity", "caption")
NOUN_TAGGERS = ("auto", "spacy", "vocabulary")

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


class NounTagger:
    """The nouns of a caption, with spaCy's part-of-speech tagger: the singular (lemma) of each
    NOUN token, in order, without repeats ("two dogs run on the grassy field" -> ["dog",
    "field"]); consecutive nouns are one compound ("a tennis racket" -> "tennis racket")."""

    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm") -> None:
        import spacy

        self.nlp = spacy.load(model, disable=["ner", "parser"])

    def __call__(self, caption: str) -> list[str]:
        out: list[str] = []
        run: list[str] = []  # consecutive nouns: one compound ("tennis racket")
        for tok in [*self.nlp(caption.lower()), None]:
            if tok is not None and tok.pos_ == "NOUN":
                run.append(tok.lemma_)
                continue
            if run and " ".join(run) not in out:
                out.append(" ".join(run))
            run = []
        return out


def load_tagger(kind: str = "auto") -> NounTagger | None:
    """The noun tagger of `kind` ("auto": spaCy's when installed, else None, the vocabulary
    rule; "spacy": spaCy's or an ImportError saying how to install it; "vocabulary": None)."""
    if kind not in NOUN_TAGGERS:
        raise ValueError(f"table1.noun_tagger must be one of {NOUN_TAGGERS}, got {kind!r}")
    if kind == "vocabulary":
        return None
    try:
        return NounTagger()
    except (ImportError, OSError) as err:
        if kind == "spacy":
            raise ImportError(
                f"table1.noun_tagger=spacy needs spaCy's English model ({err}): pip install "
                "spacy && python -m spacy download en_core_web_sm"
            ) from err
        return None


def caption_words(
    captions: Sequence[str], tagger: Callable[[str], list[str]] | None = None
) -> tuple[list[str], str]:
    """(the distinct candidate words of an image's captions, the rule that gave them): the
    tagger's nouns when it finds any, else the COCO entity vocabulary's words."""
    if tagger is not None:
        nouns = list(dict.fromkeys(w for c in captions for w in tagger(c)))
        if nouns:
            return nouns, getattr(tagger, "name", "tagger")
    words = list(dict.fromkeys(w for c in captions for w, _ in caption_entity_words(c)))
    return words, "vocabulary" if words else "none"


def pick_word(
    source: str,
    rng: np.random.Generator,
    word: str | None = None,
    captions: Sequence[str] = (),
    entity_names: Callable[[], Sequence[str]] | None = None,
    tagger: Callable[[str], list[str]] | None = None,
) -> tuple[str | None, str]:
    """(the prompt word of one image by `source`, drawn with `rng`, the rule that gave it); the
    word is None when the image has no candidate (an image without entities or nouns)."""
    if source == "fixed":
        if not word:
            raise ValueError("table1.word_from=fixed needs table1.word (e.g. bird)")
        return str(word), "fixed"
    if source == "entity":
        if entity_names is None:
            raise ValueError("table1.word_from=entity needs a data set with entity_names")
        names, rule = list(dict.fromkeys(entity_names())), "entity"  # the data set's order
    elif source == "caption":
        names, rule = caption_words(captions, tagger)
    else:
        raise ValueError(f"table1.word_from must be one of {WORD_SOURCES}, got {source!r}")
    return (str(names[int(rng.integers(len(names)))]) if names else None), rule
