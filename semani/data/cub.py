"""CUB-200-2011 birds with 10 captions per image, in AttnGAN's layout (``data=cub``).

How to get it
-------------
1. Images: CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/), extract
   ``CUB_200_2011.tgz`` into ``birds/``.
2. Captions and splits: AttnGAN's preprocessed birds metadata (``birds.zip`` linked from
   https://github.com/taoxugit/AttnGAN, "Download our preprocessed metadata for birds"), which
   holds ``text/``, ``train/filenames.pickle`` (8855 keys) and ``test/filenames.pickle`` (2933).
   The captions are Reed et al.'s (https://github.com/reedscot/cvpr2016), ``text_c10``.
   ``captions.pickle`` and ``*/char-CNN-RNN-embeddings.pickle`` are not used.

Layout (``data.root`` = the ``birds`` folder)::

    birds/
      CUB_200_2011/images.txt            "<id> <class>/<img>.jpg" per line
      CUB_200_2011/bounding_boxes.txt    "<id> <x> <y> <w> <h>" per line (same ids)
      CUB_200_2011/images/<class>/<img>.jpg
      text/<class>/<img>.txt             10 captions, one per line
      {train,test}/filenames.pickle      pickled list of keys "<class>/<img>", e.g.
                              "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18"

Each image is cropped as AttnGAN's ``get_imgs`` does (``semani.data.base.cub_crop_box``: a
square of half-side ``int(0.75·max(w, h))`` around the bird box centre, clipped to the image),
then resized to ``image_size``. The image file is the one ``images.txt`` names for the key (any
extension), which lets ShapesWorld (``semani.data.shapes``, generated in this layout with lossless
PNGs) reuse this reader: ``semani.data.shapes.ShapesWorldDataset`` adds entity masks and names.
"""

from __future__ import annotations

from pathlib import Path

from semani.data.base import (
    CaptionImageDataset,
    DataLayoutError,
    OnCorrupt,
    cub_crop_box,
    load_filenames,
    require_paths,
)
from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import Box

__all__ = ["CUBDataset", "CUB_LAYOUT", "read_cub_metadata"]

CUB_LAYOUT = """\
  <root>/CUB_200_2011/images.txt          "<id> <class>/<img>.jpg"
  <root>/CUB_200_2011/bounding_boxes.txt  "<id> <x> <y> <w> <h>"
  <root>/CUB_200_2011/images/<class>/<img>.jpg
  <root>/text/<class>/<img>.txt           10 captions, one per line
  <root>/{train,test}/filenames.pickle    pickled list of "<class>/<img>" keys
(data.root is AttnGAN's `birds` folder; see semani/data/cub.py for where to get it)"""


def read_cub_metadata(cub_dir: Path) -> tuple[dict[str, str], dict[str, list[float]]]:
    """``images.txt`` + ``bounding_boxes.txt`` -> (key -> image path, key -> [x, y, w, h])."""
    paths: dict[str, str] = {}
    id_to_key: dict[str, str] = {}
    for line in (cub_dir / "images.txt").read_text().splitlines():
        if not line.strip():
            continue
        img_id, rel = line.split(maxsplit=1)
        key = rel.strip().rsplit(".", 1)[0]
        paths[key] = rel.strip()
        id_to_key[img_id] = key
    boxes: dict[str, list[float]] = {}
    for n, line in enumerate((cub_dir / "bounding_boxes.txt").read_text().splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5 or fields[0] not in id_to_key:
            raise DataLayoutError(
                f"{cub_dir / 'bounding_boxes.txt'} line {n + 1} ({line!r}) must be "
                "'<id> <x> <y> <w> <h>' with an id from images.txt"
            )
        boxes[id_to_key[fields[0]]] = [float(v) for v in fields[1:]]
    return paths, boxes


class CUBDataset(CaptionImageDataset):
    """CUB birds, AttnGAN layout; bird-box crop; 10 captions per image."""

    n_captions = 10
    layout = CUB_LAYOUT
    layout_hint = ""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 256,
        context_length: int = 128,
        deterministic: bool | None = None,
        on_corrupt: OnCorrupt = "skip",
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        super().__init__(
            root, split, image_size, context_length, deterministic, on_corrupt, tokenizer
        )
        cub = self.root / "CUB_200_2011"
        require_paths(
            self.root,
            [
                "CUB_200_2011/images.txt",
                "CUB_200_2011/bounding_boxes.txt",
                "CUB_200_2011/images",
                "text",
                f"{split}/filenames.pickle",
            ],
            self.layout,
            self.layout_hint,
        )
        rel_paths, boxes = read_cub_metadata(cub)
        self.keys = load_filenames(self.root / split / "filenames.pickle")
        unknown = [k for k in self.keys if k not in rel_paths or k not in boxes]
        if unknown:
            raise DataLayoutError(
                f"{len(unknown)} keys of {self.root / split / 'filenames.pickle'} (e.g. "
                f"{unknown[0]!r}) are missing from CUB_200_2011/images.txt or bounding_boxes.txt"
            )
        self._image_paths = [cub / "images" / rel_paths[k] for k in self.keys]
        self._boxes = [boxes[k] for k in self.keys]
        self._load_captions([self.root / "text" / f"{k}.txt" for k in self.keys])

    def image_path(self, i: int) -> Path:
        return self._image_paths[i]

    def crop_box(self, i: int, width: int, height: int) -> Box:
        return cub_crop_box(self._boxes[i], width, height)
