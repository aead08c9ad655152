"""ShapesWorld reader (``data=shapes``): the CUB reader plus entity masks, names and phrases.

The data set is made by `semani.data.shapes_generator` (``python scripts/make_shapes.py``), which
documents its layout. `generate_shapes`, `COLORS` and `SHAPES` are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from semani.data.base import OnCorrupt, require_paths
from semani.data.cub import CUB_LAYOUT, CUBDataset
from semani.data.shapes_generator import (
    COLORS,
    SHAPES,
    SIZE_WORD_PROB,
    SIZE_WORDS,
    drop_entity_colours,
    generate_shapes,
    noun_phrase,
)
from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import Box, masks_to_tensor

__all__ = ["ShapesWorldDataset", "SHAPES_HINT", "COLORS", "SHAPES", "generate_shapes"]

SHAPES_HINT = (
    "Generate ShapesWorld with: python scripts/make_shapes.py --out <root> --n-train 2000 "
    "--n-test 200 --size 64 --seed 0"
)


class ShapesWorldDataset(CUBDataset):
    """ShapesWorld through the CUB reader, plus ``entity_masks`` / ``entity_names``.

    ``colourless_prob``: in training (not ``deterministic``), the chance that a caption is served
    without its entities' colour words (`drop_entity_colours`). Whole scenes can be told apart
    by their colours alone; captions that name only the shapes make a CLIP's scene patches carry
    shape, which the token-wise scorer needs to find an entity from its bare shape word.
    """

    layout = (
        CUB_LAYOUT.rsplit("\n", 1)[0].replace(".jpg", ".png")
        + "\n  <root>/masks/<class>/<img>_<k>.png      entity k's visible pixels, 0/255"
        + "\n  <root>/entities/<class>/<img>.json      entity names and attributes"
    )
    layout_hint = SHAPES_HINT

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 64,
        context_length: int = 128,
        deterministic: bool | None = None,
        on_corrupt: OnCorrupt = "skip",
        tokenizer: TextTokenizer | None = None,
        colourless_prob: float = 0.0,
    ) -> None:
        require_paths(Path(root).expanduser(), ["entities", "masks"], self.layout, SHAPES_HINT)
        if not 0.0 <= colourless_prob <= 1.0:
            raise ValueError(f"colourless_prob must be in [0, 1], got {colourless_prob}")
        self.colourless_prob = colourless_prob
        super().__init__(
            root, split, image_size, context_length, deterministic, on_corrupt, tokenizer
        )
        self._entities: list[tuple[list[str], list[Path]]] = []
        self._descriptions: list[list[str]] = []
        self._attributes: list[list[tuple[str, str, str]]] = []  # (size, colour, name)
        for key in self.keys:
            meta = json.loads((self.root / "entities" / f"{key}.json").read_text())
            ents = meta["entities"]
            self._entities.append(
                ([e["name"] for e in ents], [self.root / e["mask"] for e in ents])
            )
            self._descriptions.append([e["description"] for e in ents])
            self._attributes.append([(e["size"], e["color"], e["name"]) for e in ents])

    def transform_caption(self, i: int, caption: str) -> str:
        if self.colourless_prob and not self.deterministic:
            if float(torch.rand(())) < self.colourless_prob:
                return drop_entity_colours(caption)
        return caption

    def entity_descriptions(self, i: int) -> list[str]:
        """Image ``i``'s entity descriptions ("small red circle"), in ``entity_names`` order."""
        return list(self._descriptions[i])

    def entity_phrase(self, i: int, k: int, generator: torch.Generator | None = None) -> str:
        """Entity ``k`` of image ``i`` named as the captions name one (`noun_phrase`): article,
        a size word (a synonym) with probability `SIZE_WORD_PROB`, colour and shape ("a little
        red circle", "an orange star"); the draws come from `generator`."""
        size, colour, name = self._attributes[i][k]
        size_word = None
        if float(torch.rand((), generator=generator)) < SIZE_WORD_PROB:
            options = SIZE_WORDS[size]
            size_word = options[int(torch.randint(len(options), (), generator=generator))]
        return noun_phrase(size_word, colour, name)

    def load_entities(
        self, i: int, box: Box | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, list[str]]:
        names, paths = self._entities[i]
        masks = []
        for p in paths:
            with Image.open(p) as m:
                masks.append(m.convert("L"))
        return masks_to_tensor(masks, self.image_size, box), list(names)  # (K, H, W)
