"""ShapesWorld: determinism, layout, and masks/JSON/captions that agree with the pixels."""

import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semani.data.shapes import ShapesWorldDataset
from semani.data.shapes_generator import (
    COLORS,
    LOCATIONS,
    REL_MARGIN,
    SHAPES,
    drop_entity_colours,
    generate_shapes,
)
from tests.conftest import REPO_ROOT

REL_WORDS = {
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "left of": "left of",
    "right of": "right of",
}
SHAPE_RE = "|".join(SHAPES)
REL_RE = re.compile(r"\b(above|over|below|under|beneath|left of|right of)\b")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _keys(root: Path) -> list[str]:
    return [
        k
        for s in ("train", "test")
        for k in pickle.loads((root / s / "filenames.pickle").read_bytes())
    ]


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _files(generate_shapes(tmp_path / "a", n_train=6, n_test=2, size=64, seed=3))
    b = _files(generate_shapes(tmp_path / "b", n_train=6, n_test=2, size=64, seed=3))
    c = _files(generate_shapes(tmp_path / "c", n_train=6, n_test=2, size=64, seed=4))
    assert a.keys() == b.keys() and len(a) > 8 * 4
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    images = [k for k in a if k.startswith("CUB_200_2011/images/")]
    assert any(k not in c or a[k] != c[k] for k in images)  # another seed, other images


def test_layout(shapes_root: Path) -> None:
    train = pickle.loads((shapes_root / "train" / "filenames.pickle").read_bytes())
    test = pickle.loads((shapes_root / "test" / "filenames.pickle").read_bytes())
    assert len(train) == 32 and len(test) == 8 and not set(train) & set(test)
    lines = (shapes_root / "CUB_200_2011" / "images.txt").read_text().splitlines()
    boxes = (shapes_root / "CUB_200_2011" / "bounding_boxes.txt").read_text().splitlines()
    assert len(lines) == len(boxes) == 40
    for line, box in zip(lines, boxes):
        img_id, rel = line.split()
        assert box.split() == [img_id, "0.0", "0.0", "64.0", "64.0"]
        key = rel[:-4]
        assert key in train or key in test
        cls, name = key.split("/")
        assert re.fullmatch(rf"\d{{3}}\.({SHAPE_RE})", cls) and name.startswith("img_")
        with Image.open(shapes_root / "CUB_200_2011" / "images" / rel) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
        caps = (shapes_root / "text" / f"{key}.txt").read_text().splitlines()
        assert len(caps) == 10 and all(caps)


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    dx, dy = a - b
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def test_masks_json_and_captions_agree(shapes_root: Path) -> None:
    n_entities, n_rel_words, n_locations = [], 0, 0
    all_captions = set()
    for key in _keys(shapes_root):
        meta = json.loads((shapes_root / "entities" / f"{key}.json").read_text())
        image = np.asarray(Image.open(shapes_root / meta["image"]).convert("RGB"))
        caps = (shapes_root / "text" / f"{key}.txt").read_text().splitlines()
        all_captions.update(caps)
        ents = meta["entities"]
        names = [e["name"] for e in ents]
        assert 1 <= len(ents) <= 3 and len(set(names)) == len(names)  # distinct kinds
        assert key.split("/")[0].split(".")[1] in names
        union = np.zeros(image.shape[:2], bool)
        centers = []
        for k, e in enumerate(ents):
            assert e["mask"] == f"masks/{key}_{k}.png"
            m = np.asarray(Image.open(shapes_root / e["mask"])) > 0
            assert m.sum() == e["area"] > 20
            assert not (m & union).any()  # visible masks are disjoint
            union |= m
            assert (image[m] == np.asarray(e["rgb"])).all()  # entity colour, exactly
            ys, xs = np.nonzero(m)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == e["bbox"]
            centers.append(np.array([xs.mean(), ys.mean()]))
            assert np.allclose(centers[-1], e["center"], atol=0.01)
            assert e["description"] == f"{e['size']} {e['color']} {e['name']}"
            if e["location"] is not None:  # third of the image the centroid lies in
                col = {"left": 0, "right": 2}.get(e["location"].split()[-1], 1)
                row = {"top": 0, "bottom": 2}.get(e["location"].split()[0], 1)
                assert int(centers[-1][0] / 64 * 3) == col and int(centers[-1][1] / 64 * 3) == row
        # background pixels never have an entity's colour
        assert not any((image[~union] == np.asarray(e["rgb"])).all(-1).any() for e in ents)
        for r in meta["relations"]:
            s, o = centers[r["subject"]], centers[r["object"]]
            assert _relation(s, o) == r["relation"]
            assert np.abs(s - o).max() >= REL_MARGIN * 64
        rels = {
            (names[r["subject"]], names[r["object"]]): r["relation"] for r in meta["relations"]
        }
        inverse = {
            "above": "below",
            "below": "above",
            "left of": "right of",
            "right of": "left of",
        }
        rels.update({(o, s): inverse[v] for (s, o), v in list(rels.items())})
        for cap in caps:
            for e in ents:  # every entity named, with its colour
                assert re.search(rf"\b{e['color']} {e['name']}\b", cap), (cap, e)
            for m in REL_RE.finditer(cap):
                before = re.findall(SHAPE_RE, cap[: m.start()])[-1]
                after = re.findall(SHAPE_RE, cap[m.end() :])[0]
                assert rels[(before, after)] == REL_WORDS[m.group(1)], (cap, rels)
                n_rel_words += 1
            if len(ents) == 1 and any(p in cap for p in LOCATIONS.values()):
                assert LOCATIONS[ents[0]["location"]] in cap
                n_locations += 1
        n_entities.append(len(ents))
    assert set(n_entities) == {1, 2, 3}
    assert n_rel_words > 20 and n_locations > 0
    assert len(all_captions) > 300  # varied phrasings (40 images x 10 captions)


def test_dataset_reads_entities(shapes_root: Path) -> None:
    ds = ShapesWorldDataset(shapes_root, split="test", image_size=64)
    assert len(ds) == 8 and ds.deterministic
    s = ds[3]
    meta = json.loads((shapes_root / "entities" / f"{ds.keys[3]}.json").read_text())
    assert s["entity_names"] == [e["name"] for e in meta["entities"]]
    assert s["entity_masks"].shape == (len(meta["entities"]), 64, 64)
    for m, e in zip(s["entity_masks"], meta["entities"]):
        ref = np.asarray(Image.open(shapes_root / e["mask"])) > 0
        assert torch.equal(m, torch.from_numpy(ref.astype(np.float32)))
        rgb = ((s["image"][:, m.bool()] + 1) * 127.5).round().T  # (N, 3)
        assert (rgb == torch.tensor(e["rgb"], dtype=torch.float32)).all()
    caps = (shapes_root / "text" / f"{ds.keys[3]}.txt").read_text().splitlines()
    assert s["caption"] == caps[3 % 10] and ds[3]["caption"] == s["caption"]


def test_cli_and_overwrite(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from make_shapes import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "sw"
    args = ["--out", str(out), "--n-train", "3", "--n-test", "1", "--size", "32", "--seed", "1"]
    assert main(args) == out
    first = _files(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(args)
    main([*args, "--overwrite"])
    assert _files(out) == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path / "other", 1, 1, 32, 0, overwrite=True)
    assert (tmp_path / "other" / "keep.txt").exists()


def test_drop_entity_colours_keeps_shapes_background_and_grammar() -> None:
    assert drop_entity_colours("an orange circle left of a small red square") == (
        "a circle left of a small square"
    )
    assert drop_entity_colours(
        "a white triangle and a blue diamond on a grainy dark gray background"
    ) == ("a triangle and a diamond on a grainy dark gray background")
    # "white" names the background here, not an entity: it stays
    assert drop_entity_colours("a big purple cross on a white background") == (
        "a big cross on a white background"
    )
    assert drop_entity_colours("a red circle above an orange star") == "a circle above a star"


def test_colourless_captions_only_in_training(shapes_root: Path) -> None:
    colours = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")
    train = ShapesWorldDataset(shapes_root, "train", 64, 40, colourless_prob=1.0)
    for i in range(6):
        sample = train[i]
        assert not colours.search(sample["caption"]), sample["caption"]
        assert sample["caption"] in {drop_entity_colours(c) for c in train.captions[i]}
    plain = ShapesWorldDataset(shapes_root, "train", 64, 40, colourless_prob=0.0)
    assert all(plain[i]["caption"] in plain.captions[i] for i in range(6))
    test = ShapesWorldDataset(shapes_root, "test", 64, 40, colourless_prob=1.0)
    assert test[0]["caption"] == test.captions[0][0]  # evaluation captions are never changed
    with pytest.raises(ValueError, match="colourless_prob"):
        ShapesWorldDataset(shapes_root, "train", 64, 40, colourless_prob=1.5)


def test_colourless_captions_is_a_shapes_option(shapes_root: Path) -> None:
    from semani.data.datamodule import SemaniDataModule

    with pytest.raises(ValueError, match="ShapesWorld option"):
        SemaniDataModule("cub", str(shapes_root), colourless_captions=0.5)
    dm = SemaniDataModule("shapes", str(shapes_root), image_size=64, colourless_captions=0.25)
    assert dm._reader("train", deterministic=False).colourless_prob == 0.25
