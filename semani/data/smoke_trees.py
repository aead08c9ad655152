"""Generated data in the real on-disk layouts of the paper's data sets, for runs that must read
them as a user's would (`scripts/smoke_paper.py`: every paper experiment once at full
architecture size) without the data sets themselves.

Every image is a ShapesWorld scene (`semani.data.shapes_generator`) rendered at the asked size;
the layouts are the ones the readers document:

- `write_cub(root)`: AttnGAN's `birds/` (CUB_200_2011/images.txt, bounding_boxes.txt,
  images/<class>/<img>, text/, train|test/filenames.pickle): ShapesWorld is already written in
  CUB's layout, so this is `generate_shapes` itself.
- `write_coco(root)`: AttnGAN's `coco/` (images/COCO_{train,val}2014_<12 digits>.jpg, text/,
  train|test/filenames.pickle) and COCO's `annotations/instances_{train,val}2014.json` with one
  polygon per shape. Each shape kind stands for a COCO category (`SHAPE_TO_COCO`) and the
  captions name it, so Table I's caption words and the instance names exist.
- `write_webdataset(root)`: img2dataset's webdataset shards (`{00000..N}.tar` of
  `<9-digit key>.jpg` + `.txt`), CC12M's pre-training layout.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from semani.data.shapes_generator import generate_shapes, make_scene

__all__ = ["SHAPE_TO_COCO", "write_coco", "write_cub", "write_webdataset"]

# the COCO category each ShapesWorld shape stands for in write_coco's captions and instances
SHAPE_TO_COCO = {
    "circle": "clock",
    "square": "book",
    "triangle": "kite",
    "star": "frisbee",
    "hexagon": "donut",
    "diamond": "vase",
    "cross": "bird",
}
_COCO_IDS = {
    "clock": 85,
    "book": 84,
    "kite": 38,
    "frisbee": 34,
    "donut": 60,
    "vase": 86,
    "bird": 16,
}


def _fresh(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


def write_cub(root: str | Path, n_train: int = 4, n_test: int = 2, size: int = 256) -> Path:
    """AttnGAN's CUB layout (`data=cub data.root=<root>`) of ShapesWorld scenes; replaces
    `root`."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    return generate_shapes(root, n_train, n_test, size=size, seed=0)


def _coco_caption(caption: str) -> str:
    for shape, category in SHAPE_TO_COCO.items():
        caption = caption.replace(shape, category)
    return caption


def write_coco(root: str | Path, n_train: int = 4, n_test: int = 2, size: int = 512) -> Path:
    """AttnGAN's COCO layout plus COCO's instances files (`data=coco data.root=<root>
    data.instances_json={train: <root>/annotations/instances_train2014.json, test: ...val...}`);
    replaces `root`. Images are JPEGs; every shape is a non-crowd instance whose polygon is the
    bounding box of its visible pixels (a rectangle, decoded by the reader with pycocotools)."""
    root = Path(root)
    _fresh(root)
    (root / "images").mkdir()
    (root / "text").mkdir()
    (root / "annotations").mkdir()
    categories = [{"id": i, "name": n, "supercategory": n} for n, i in _COCO_IDS.items()]
    ann_id = 1
    for split, subset, n, offset in (
        ("train", "train2014", n_train, 0),
        ("test", "val2014", n_test, n_train),
    ):
        keys, images, annotations = [], [], []
        for j in range(n):
            image_id = offset + j + 1
            rng = np.random.default_rng([0, offset + j])
            scene, captions = make_scene(rng, size)
            key = f"COCO_{subset}_{image_id:012d}"
            keys.append(key)
            Image.fromarray(scene["image"], mode="RGB").save(
                root / "images" / f"{key}.jpg", quality=95
            )
            captions = [_coco_caption(c) for c in captions[:5]]
            (root / "text" / f"{key}.txt").write_text("\n".join(captions) + "\n")
            images.append(
                {"id": image_id, "file_name": f"{key}.jpg", "height": size, "width": size}
            )
            for entity, mask in zip(scene["entities"], scene["masks"]):
                ys, xs = np.nonzero(mask)
                if len(xs) == 0:
                    continue
                x0, y0, x1, y1 = (
                    float(xs.min()),
                    float(ys.min()),
                    float(xs.max() + 1),
                    float(ys.max() + 1),
                )
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": _COCO_IDS[SHAPE_TO_COCO[entity["name"]]],
                        "iscrowd": 0,
                        "area": float(mask.sum()),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    }
                )
                ann_id += 1
        (root / split).mkdir()
        (root / split / "filenames.pickle").write_bytes(pickle.dumps(keys, protocol=2))
        instances = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{subset}.json").write_text(json.dumps(instances))
    return root


def write_webdataset(
    root: str | Path, n_shards: int = 2, per_shard: int = 4, size: int = 256
) -> Path:
    """img2dataset's webdataset output (`data=cc12m data.root=<root>
    data.shards='{00000..<n_shards-1>}.tar'`): `<key>.jpg` + `<key>.txt` per sample, keys of 9
    digits; replaces `root`."""
    root = Path(root)
    _fresh(root)
    for shard in range(n_shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(per_shard):
                index = shard * per_shard + j
                rng = np.random.default_rng([1, index])
                scene, captions = make_scene(rng, size)
                buf = io.BytesIO()
                Image.fromarray(scene["image"], mode="RGB").save(buf, format="JPEG", quality=95)
                caption = captions[0].encode()
                for ext, payload in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root
