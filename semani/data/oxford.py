"""Oxford-102 flowers with 10 captions per image, in StackGAN's layout (``data=oxford``).

How to get it
-------------
1. Images: ``102flowers.tgz`` from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/, extract
   into ``flowers/`` (gives ``flowers/jpg/image_00001.jpg`` ... ``image_08189.jpg``).
2. Captions: Reed et al.'s ``cvpr2016_flowers`` (https://github.com/reedscot/cvpr2016), whose
   ``text_c10/class_XXXXX/image_XXXXX.txt`` holds 10 captions per image.
3. Splits: StackGAN's preprocessed flowers metadata (``flowers.zip`` linked from
   https://github.com/hanzhanggit/StackGAN, "Data/README.md"), holding
   ``train/filenames.pickle`` (7034 keys) and ``test/filenames.pickle`` (1155 keys).

Layout (``data.root`` = the ``flowers`` folder)::

    flowers/
      jpg/image_XXXXX.jpg
      text_c10/class_XXXXX/image_XXXXX.txt    10 captions, one per line
      train/filenames.pickle                  pickled list of keys
      test/filenames.pickle

StackGAN's pickles hold keys like ``jpg/image_06734`` (and StackGAN looked the class folder up in
``class_info.pickle``); other preprocessings write ``class_00001/image_06734`` or ``image_06734``.
All three are accepted: the image is ``jpg/<image name>.jpg`` and the caption file is found by
image name in ``text_c10/*/``. Images are resized (shorter side) and centre-cropped.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from semani.data.base import (
    CaptionImageDataset,
    DataLayoutError,
    OnCorrupt,
    load_filenames,
    require_paths,
)
from semani.data.tokenizer import TextTokenizer

__all__ = ["OxfordFlowersDataset", "OXFORD_LAYOUT"]

OXFORD_LAYOUT = """\
  <root>/jpg/image_XXXXX.jpg
  <root>/text_c10/class_XXXXX/image_XXXXX.txt   10 captions, one per line
  <root>/{train,test}/filenames.pickle          pickled list of keys such as "jpg/image_06734"
(data.root is StackGAN's `flowers` folder; see semani/data/oxford.py for where to get it)"""


def _caption_index(text_dir: Path) -> dict[str, Path]:
    """image name -> caption file, over every ``text_c10/class_*/image_*.txt``."""
    index: dict[str, Path] = {}
    for cls in sorted(os.scandir(text_dir), key=lambda e: e.name):
        if not cls.is_dir():
            continue
        for entry in os.scandir(cls.path):
            if entry.name.endswith(".txt"):
                index[entry.name[:-4]] = Path(entry.path)
    return index


class OxfordFlowersDataset(CaptionImageDataset):
    """Oxford-102 flowers, StackGAN layout; 10 captions per image."""

    n_captions = 10

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
        require_paths(self.root, ["jpg", "text_c10", f"{split}/filenames.pickle"], OXFORD_LAYOUT)
        self.keys = load_filenames(self.root / split / "filenames.pickle")
        names = [PurePosixPath(k).name for k in self.keys]
        bad = [k for k, n in zip(self.keys, names) if not n.startswith("image_")]
        if bad:
            raise DataLayoutError(
                f"{self.root / split / 'filenames.pickle'} holds keys like {bad[0]!r}; expected "
                "'jpg/image_XXXXX', 'class_XXXXX/image_XXXXX' or 'image_XXXXX'"
            )
        captions = _caption_index(self.root / "text_c10")
        caption_paths = []
        for key, name in zip(self.keys, names):
            direct = self.root / "text_c10" / f"{key}.txt"
            path = direct if key.startswith("class_") and direct.is_file() else captions.get(name)
            if path is None:
                raise DataLayoutError(
                    f"no caption file text_c10/class_*/{name}.txt under {self.root} for key "
                    f"{key!r}. Expected layout:\n{OXFORD_LAYOUT}"
                )
            caption_paths.append(path)
        self._image_paths = [self.root / "jpg" / f"{n}.jpg" for n in names]
        self._load_captions(caption_paths)

    def image_path(self, i: int) -> Path:
        return self._image_paths[i]
