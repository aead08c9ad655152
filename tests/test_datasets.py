"""CUB / Oxford / COCO / webdataset readers on tiny trees written in their real layouts."""

import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semani.data.base import (
    CaptionFileError,
    CorruptImageError,
    DataLayoutError,
    collate_samples,
    cub_crop_box,
    load_filenames,
)
from semani.data.coco import COCODataset
from semani.data.cub import CUBDataset
from semani.data.oxford import OxfordFlowersDataset
from semani.data.shapes import ShapesWorldDataset
from semani.data.tokenizer import TextTokenizer
from semani.data.transforms import crop_resize
from semani.data.webdataset import make_webdataset, resolve_shards

BLUE, GREEN, RED = (20, 40, 230), (30, 200, 40), (230, 30, 30)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(context_length=32)


def _jpeg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format="JPEG", quality=100, subsampling=0)


def _captions(path: Path, stem: str, n: int) -> list[str]:
    caps = [f"{stem} caption number {j}" for j in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(caps) + "\n\n")  # trailing empty lines are ignored
    return caps


def _pickle(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(keys, protocol=2))  # AttnGAN/StackGAN wrote protocol 2


# -- CUB ----------------------------------------------------------------------------------------
CUB_KEYS = [
    "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18",
    "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34",
    "002.Laysan_Albatross/Laysan_Albatross_0002_1027",
]


def make_cub(root: Path) -> Path:
    """birds/: 3 images 100x80; image 0 has the box (30, 20, 20, 16) -> crop (25, 13, 55, 43),
    green on the crop's left half, red on its right half, blue elsewhere."""
    lines, boxes = [], []
    for i, key in enumerate(CUB_KEYS):
        arr = np.zeros((80, 100, 3)) + BLUE
        arr[13:43, 25:40], arr[13:43, 40:55] = GREEN, RED
        _jpeg(root / "CUB_200_2011" / "images" / f"{key}.jpg", arr)
        lines.append(f"{i + 1} {key}.jpg")
        boxes.append(f"{i + 1} {'30.0 20.0 20.0 16.0' if i == 0 else '0.0 0.0 40.0 20.0'}")
        _captions(root / "text" / f"{key}.txt", f"bird{i}", 10)
    (root / "CUB_200_2011" / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "CUB_200_2011" / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    _pickle(root / "train" / "filenames.pickle", CUB_KEYS[:2])
    _pickle(root / "test" / "filenames.pickle", CUB_KEYS[2:] + CUB_KEYS[:1])
    return root


def test_cub_crop_box_maths() -> None:
    assert cub_crop_box([30, 20, 20, 16], 100, 80) == (25, 13, 55, 43)  # r = 15, centre (40, 28)
    assert cub_crop_box([0, 0, 40, 20], 100, 80) == (0, 0, 50, 40)  # clipped at the top-left
    assert cub_crop_box([60.9, 50.2, 39.0, 29.0], 100, 80) == (50, 35, 100, 80)  # ints, clipped


def test_cub_sample(tmp_path: Path, tok: TextTokenizer) -> None:
    root = make_cub(tmp_path / "birds")
    ds = CUBDataset(root, split="train", image_size=32, context_length=32, tokenizer=tok)
    assert len(ds) == 2 and not ds.deterministic
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert s["index"] == 0 and "entity_masks" not in s
    # the crop is exactly AttnGAN's box: same as cropping the file by hand ...
    with Image.open(root / "CUB_200_2011" / "images" / f"{CUB_KEYS[0]}.jpg") as img:
        ref = np.asarray(crop_resize(img.convert("RGB"), 32, (25, 13, 55, 43)), dtype=np.float32)
    assert torch.allclose(
        (s["image"] + 1) * 127.5, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-3
    )
    # ... and shows only the green | red halves, no blue background
    rgb = ((s["image"] + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(rgb[4:28, 3:12] - GREEN).max() < 30 and np.abs(rgb[4:28, 20:29] - RED).max() < 30
    assert rgb[..., 2].max() < 80  # no blue background anywhere in the crop
    caps = [f"bird0 caption number {j}" for j in range(10)]
    draws = {ds[0]["caption"] for _ in range(40)}
    assert draws <= set(caps) and len(draws) > 1  # training: a random caption of the image
    assert torch.equal(s["tokens"], tok([s["caption"]])[0]) and s["tokens"].shape == (32,)


def test_cub_eval_is_deterministic(tmp_path: Path, tok: TextTokenizer) -> None:
    root = make_cub(tmp_path / "birds")
    ds = CUBDataset(root, split="test", image_size=32, context_length=32, tokenizer=tok)
    assert ds.deterministic and ds.keys == [CUB_KEYS[2], CUB_KEYS[0]]
    assert [ds[i]["caption"] for i in range(2)] == [
        "bird2 caption number 0",
        "bird0 caption number 1",
    ]
    assert ds[1]["caption"] == ds[1]["caption"]
    train_det = CUBDataset(root, "train", 32, 32, deterministic=True, tokenizer=tok)
    assert {train_det[1]["caption"] for _ in range(5)} == {"bird1 caption number 1"}


def test_cub_bad_layouts(tmp_path: Path, tok: TextTokenizer) -> None:
    with pytest.raises(DataLayoutError, match=r"does not exist(.|\n)*bounding_boxes.txt"):
        CUBDataset(tmp_path / "nowhere", tokenizer=tok, context_length=32)
    root = make_cub(tmp_path / "birds")
    (root / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(DataLayoutError, match="lacks CUB_200_2011/bounding_boxes.txt"):
        CUBDataset(root, tokenizer=tok, context_length=32)
    with pytest.raises(DataLayoutError, match="make_shapes.py"):
        ShapesWorldDataset(tmp_path / "no_shapes", tokenizer=tok, context_length=32)
    root2 = make_cub(tmp_path / "birds2")
    _pickle(root2 / "train" / "filenames.pickle", ["003.Nope/Nope_0001"])
    with pytest.raises(DataLayoutError, match="Nope_0001"):
        CUBDataset(root2, tokenizer=tok, context_length=32)


def test_short_caption_file_is_an_error(tmp_path: Path, tok: TextTokenizer) -> None:
    root = make_cub(tmp_path / "birds")
    bad = root / "text" / f"{CUB_KEYS[1]}.txt"
    bad.write_text("\n".join(f"only {j}" for j in range(9)))
    with pytest.raises(CaptionFileError, match=f"{bad}.* 9 captions, expected at least 10"):
        CUBDataset(root, split="train", tokenizer=tok, context_length=32)


def test_corrupt_image_skip_and_raise(tmp_path: Path, tok: TextTokenizer, caplog) -> None:
    root = make_cub(tmp_path / "birds")
    path = root / "CUB_200_2011" / "images" / f"{CUB_KEYS[0]}.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    ds = CUBDataset(root, split="train", image_size=32, context_length=32, tokenizer=tok)
    with caplog.at_level(logging.WARNING, logger="semani.data.base"):
        s = ds[0]
    assert s["index"] == 1 and ds.n_corrupt == 1  # skipped, next image served, counted
    assert "corrupt image (1 so far)" in caplog.text and str(path) in caplog.text
    caplog.clear()
    assert ds[0]["index"] == 1 and ds.n_corrupt == 1 and not caplog.text  # known: no retry
    ds_raise = CUBDataset(root, "train", 32, 32, on_corrupt="raise", tokenizer=tok)
    with pytest.raises(CorruptImageError, match=str(path.name)):
        ds_raise[0]
    with pytest.raises(ValueError, match="on_corrupt"):
        CUBDataset(root, "train", 32, 32, on_corrupt="ignore", tokenizer=tok)


def test_filenames_pickle_is_restricted(tmp_path: Path) -> None:
    evil = tmp_path / "filenames.pickle"
    evil.write_bytes(pickle.dumps(os.getcwd))  # a global other than a list of keys
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_filenames(evil)
    ok = tmp_path / "ok.pickle"
    ok.write_bytes(pickle.dumps(np.array(["a/b", "c/d"]), protocol=2))
    assert load_filenames(ok) == ["a/b", "c/d"]


# -- Oxford -------------------------------------------------------------------------------------
def test_oxford_key_forms(tmp_path: Path, tok: TextTokenizer) -> None:
    root = tmp_path / "flowers"
    for n, cls in [(1, 1), (2, 1), (3, 77)]:
        _jpeg(root / "jpg" / f"image_{n:05d}.jpg", np.zeros((30, 40, 3)) + GREEN)
        _captions(root / "text_c10" / f"class_{cls:05d}" / f"image_{n:05d}.txt", f"flower{n}", 10)
    _pickle(root / "train" / "filenames.pickle", ["jpg/image_00001", "class_00001/image_00002"])
    _pickle(root / "test" / "filenames.pickle", ["image_00003"])
    train = OxfordFlowersDataset(root, "train", image_size=16, context_length=32, tokenizer=tok)
    assert [c[0] for c in train.captions] == [
        "flower1 caption number 0",
        "flower2 caption number 0",
    ]
    s = OxfordFlowersDataset(root, "test", 16, 32, tokenizer=tok)[0]
    assert s["image"].shape == (3, 16, 16) and s["caption"] == "flower3 caption number 0"
    assert torch.allclose(
        (s["image"] + 1) * 127.5, torch.tensor(GREEN, dtype=torch.float32)[:, None, None], atol=6
    )
    _pickle(root / "test" / "filenames.pickle", ["jpg/image_00009"])
    with pytest.raises(DataLayoutError, match="image_00009"):
        OxfordFlowersDataset(root, "test", 16, 32, tokenizer=tok)
    with pytest.raises(DataLayoutError, match="text_c10"):
        OxfordFlowersDataset(tmp_path / "empty", "test", 16, 32, tokenizer=tok)


# -- COCO ---------------------------------------------------------------------------------------
def make_coco(root: Path) -> tuple[Path, Path]:
    keys = ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
    for k in keys:
        _jpeg(root / "images" / f"{k}.jpg", np.zeros((48, 64, 3)) + BLUE)
        _captions(root / "text" / f"{k}.txt", k[-2:], 7)  # some AttnGAN files hold > 5
    _pickle(root / "train" / "filenames.pickle", keys)
    instances = {
        "images": [
            {"id": 9, "height": 48, "width": 64, "file_name": f"{keys[0]}.jpg"},
            {"id": 25, "height": 48, "width": 64, "file_name": f"{keys[1]}.jpg"},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [  # a dog rectangle x 8..24, y 8..40; a crowd region (dropped)
            {
                "id": 1,
                "image_id": 9,
                "category_id": 18,
                "iscrowd": 0,
                "area": 512.0,
                "bbox": [8, 8, 16, 32],
                "segmentation": [[8, 8, 24, 8, 24, 40, 8, 40]],
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 1,
                "iscrowd": 1,
                "area": 100.0,
                "bbox": [40, 0, 10, 10],
                "segmentation": {"size": [48, 64], "counts": [1920, 10, 1142]},
            },
        ],
    }
    path = root / "annotations" / "instances_train2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps(instances))
    return root, path


def test_coco_captions_and_instances(tmp_path: Path, tok: TextTokenizer) -> None:
    root, inst = make_coco(tmp_path / "coco")
    plain = COCODataset(root, "train", image_size=32, context_length=32, tokenizer=tok)
    assert all(len(c) == 5 for c in plain.captions) and "entity_masks" not in plain[0]
    ds = COCODataset(root, "train", 32, 32, tokenizer=tok, instances_json={"train": str(inst)})
    s = ds[0]
    assert s["entity_names"] == ["dog"] and s["entity_masks"].shape == (1, 32, 32)
    # 64x48 -> 43x32 (x2/3), centre crop from x = 5: the rectangle lands at x 0.3..11, y 5.3..26.7
    m = s["entity_masks"][0]
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert m[16, 5] == 1 and m[3, 5] == 0 and m[16, 20] == 0 and m[30, 5] == 0
    assert abs(m.sum().item() - 11 * 21.3) < 0.15 * 11 * 21.3
    s1 = ds[1]  # no annotation: no entity
    assert s1["entity_masks"].shape == (0, 32, 32) and s1["entity_names"] == []
    batch = collate_samples([s, s1])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["index"].tolist() == [0, 1]
    assert batch["entity_names"] == [["dog"], []] and [
        t.shape[0] for t in batch["entity_masks"]
    ] == [1, 0]
    _pickle(root / "test" / "filenames.pickle", ["COCO_val2014_000000000042"])
    (root / "text" / "COCO_val2014_000000000042.txt").write_text("one\ntwo\n")
    with pytest.raises(CaptionFileError, match="COCO_val2014_000000000042.txt"):
        COCODataset(root, "test", 32, 32, tokenizer=tok)
    _captions(root / "text" / "COCO_val2014_000000000042.txt", "val", 5)
    with pytest.raises(DataLayoutError, match="instances_val2014.json for test"):
        COCODataset(root, "test", 32, 32, tokenizer=tok, instances_json=str(inst))


# -- webdataset ---------------------------------------------------------------------------------
def make_shards(root: Path) -> dict[int, str]:
    """Two img2dataset-style shards; sample 4 has a corrupt JPEG."""
    root.mkdir(parents=True)
    captions = {}
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for j in range(3):
                idx = shard * 3 + j
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), RED).save(buf, format="JPEG")
                data = buf.getvalue()[:100] if idx == 4 else buf.getvalue()
                captions[idx] = f"web caption {idx}"
                for ext, payload in [("jpg", data), ("txt", captions[idx].encode())]:
                    info = tarfile.TarInfo(f"{idx:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return captions


def test_webdataset_stream(tmp_path: Path, tok: TextTokenizer) -> None:
    captions = make_shards(tmp_path / "cc12m")
    urls = resolve_shards(tmp_path / "cc12m", "{00000..00001}.tar")
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar"]
    ds = make_webdataset(urls, image_size=16, tokenizer=tok, train=False)
    samples = list(ds)
    assert [s["index"] for s in samples] == [0, 1, 2, 3, 5]  # corrupt sample 4 skipped
    assert all(s["caption"] == captions[s["index"]] for s in samples)
    assert samples[0]["image"].shape == (3, 16, 16) and samples[0]["tokens"].shape == (32,)
    train = make_webdataset(urls, 16, tok, train=True, shuffle_buffer=10, seed=1)
    assert sorted(s["index"] for s in train) == [0, 1, 2, 3, 5]
    capped = make_webdataset(urls, 16, tok, train=False, max_samples=2)
    assert len(list(capped)) == 2
    with pytest.raises(CorruptImageError, match="000000004"):
        list(make_webdataset(urls, 16, tok, train=False, on_corrupt="raise"))
    with pytest.raises(DataLayoutError, match="missing"):
        resolve_shards(tmp_path / "cc12m", "{00000..00002}.tar")


def test_webdataset_datamodule(tmp_path: Path) -> None:
    from semani.data.datamodule import SemaniDataModule

    make_shards(tmp_path / "cc12m")
    dm = SemaniDataModule(
        "webdataset",
        str(tmp_path / "cc12m"),
        image_size=16,
        batch_size=2,
        num_workers=0,
        context_length=32,
        shards="{00000..00001}.tar",
        val_shards="00001.tar",
        shuffle_buffer=4,
    )
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert [b["image"].shape for b in train] == [(2, 3, 16, 16)] * 2  # 5 readable, last dropped
    assert train[0]["tokens"].shape == (2, 32) and len(train[0]["caption"]) == 2
    val = list(dm.val_dataloader())
    assert torch.cat([b["index"] for b in val]).tolist() == [3, 5]
    resampled = SemaniDataModule(
        "webdataset",
        str(tmp_path / "cc12m"),
        image_size=16,
        batch_size=2,
        num_workers=0,
        context_length=32,
        shards="{00000..00001}.tar",
        resampled=True,
        epoch_size=6,
    )
    resampled.setup("fit")
    assert sum(len(b["caption"]) for b in resampled.train_dataloader()) == 6
