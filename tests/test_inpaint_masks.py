"""Random inpainting masks (boxes, brush strokes) and the per-sample mask sampler."""

import pytest
import torch

from semani.data.inpaint_masks import MaskSampler, random_box_mask, random_stroke_mask

SIZES = [(64, 64), (48, 80), (32, 20)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn", [random_box_mask, random_stroke_mask])
@pytest.mark.parametrize("size", SIZES)
def test_random_masks_binary_and_within_coverage(fn, size: tuple[int, int]) -> None:
    for seed in range(15):
        mask = fn(*size, gen(seed), min_cover=0.15, max_cover=0.4)
        assert mask.shape == size and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.15 <= mask.mean().item() <= 0.4, (seed, mask.mean().item())


@pytest.mark.parametrize("fn", [random_box_mask, random_stroke_mask])
def test_random_masks_are_seeded(fn) -> None:
    a, b, c = fn(64, 64, gen(3)), fn(64, 64, gen(3)), fn(64, 64, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_box_mask_is_one_rectangle() -> None:
    mask = random_box_mask(48, 80, gen(0), min_cover=0.1, max_cover=0.5, max_aspect=3.0)
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == h * w  # filled rectangle
    assert max(h / w, w / h) <= 3.0


def test_bad_coverage_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_cover"):
        random_box_mask(8, 8, gen(0), min_cover=0.6, max_cover=0.5)


def entities() -> torch.Tensor:
    """Three disjoint entities of a 16 x 16 image (K, H, W), the middle one empty."""
    masks = torch.zeros(3, 16, 16)
    masks[0, :4, :4] = 1
    masks[2, 8:, 8:] = 1
    return masks


def test_sampler_entity_masks_come_from_the_sample() -> None:
    sampler = MaskSampler(entity=1.0, box=0.0, stroke=0.0)
    ents = entities()
    masks, kinds = sampler.sample(6, (16, 16), gen(0), [ents] * 6)
    assert kinds == ["entity"] * 6 and masks.shape == (6, 1, 16, 16)
    for m in masks[:, 0]:  # one of the non-empty entities, never the empty one
        assert torch.equal(m, ents[0]) or torch.equal(m, ents[2])


def test_sample_one_names_the_entities_it_covers() -> None:
    ents = entities()  # entity 1 is empty: never chosen
    for union in (0.0, 1.0):
        sampler = MaskSampler(entity=1.0, box=0.0, stroke=0.0, entity_union=union)
        for seed in range(6):
            mask, kind, chosen = sampler.sample_one((16, 16), gen(seed), ents)
            assert kind == "entity" and chosen and set(chosen) <= {0, 2}
            assert len(chosen) == (2 if union else 1)
            assert torch.equal(mask, ents[chosen].amax(0))
    mask, kind, chosen = MaskSampler(entity=0.0, box=1.0, stroke=0.0).sample_one(
        (16, 16), gen(0), ents
    )
    assert kind == "box" and chosen == [] and mask.sum() > 0


def test_sampler_union_of_entities() -> None:
    sampler = MaskSampler(entity=1.0, box=0.0, stroke=0.0, entity_union=1.0)
    ents = entities()
    masks, _ = sampler.sample(2, (16, 16), gen(0), [ents, ents])
    assert torch.equal(masks[0, 0], ents.amax(0))  # both usable entities


def test_sampler_without_entities_uses_random_masks() -> None:
    sampler = MaskSampler(entity=0.5, box=0.25, stroke=0.25, min_cover=0.1, max_cover=0.5)
    masks, kinds = sampler.sample(8, (32, 32), gen(1), [torch.zeros(0, 32, 32), None] * 4)
    assert set(kinds) <= {"box", "stroke"}
    cover = masks.flatten(1).mean(1)
    assert ((cover >= 0.1) & (cover <= 0.5)).all()
    again, _ = sampler.sample(8, (32, 32), gen(1), [torch.zeros(0, 32, 32), None] * 4)
    assert torch.equal(masks, again)


def test_sampler_skips_small_entities_and_resizes() -> None:
    sampler = MaskSampler(entity=1.0, box=1.0, stroke=0.0, entity_min_cover=0.2)
    ents = entities()  # entity 0 covers 1/16, entity 2 1/4 of the image
    masks, kinds = sampler.sample(8, (32, 32), gen(0), [ents] * 8)
    big = torch.nn.functional.interpolate(ents[None, 2:3], size=(32, 32))[0, 0]
    for m, kind in zip(masks[:, 0], kinds):
        assert kind == "box" or torch.equal(m, big)
    assert "entity" in kinds


def test_sampler_needs_some_weight() -> None:
    with pytest.raises(ValueError, match="not all 0"):
        MaskSampler(entity=0.0, box=0.0, stroke=0.0)
    with pytest.raises(ValueError, match="random masks some weight"):
        MaskSampler(entity=1.0, box=0.0, stroke=0.0).sample(1, (8, 8), gen(0), None)


def test_inpaint_mask_dataset_draws_from_the_samples_entities(shapes_root) -> None:
    from semani.data.inpaint_masks import InpaintMaskDataset
    from semani.data.shapes import ShapesWorldDataset

    base = ShapesWorldDataset(shapes_root, "train", 32, 40, deterministic=True)
    ds = InpaintMaskDataset(base, entity=1.0, box=0.0, stroke=0.0)
    torch.manual_seed(0)
    first = [ds[i] for i in range(4)]
    torch.manual_seed(0)  # the worker's RNG seeds each sample's draw
    again = [ds[i] for i in range(4)]
    for i, (a, b) in enumerate(zip(first, again)):
        assert a["inpaint_mask"].shape == (1, 32, 32) and a["mask_kind"] == "entity"
        assert torch.equal(a["inpaint_mask"], b["inpaint_mask"])
        ents = base[i]["entity_masks"] >= 0.5  # one of the image's own entities
        assert any(torch.equal(a["inpaint_mask"][0] > 0, e) for e in ents)
        assert torch.equal(a["image"], base[i]["image"])
    boxes = InpaintMaskDataset(base, entity=0.0, box=1.0, stroke=0.0, min_cover=0.2)
    m = boxes[0]["inpaint_mask"]
    assert boxes[0]["mask_kind"] == "box" and 0.2 <= m.mean() <= 0.5
    with pytest.raises(TypeError):
        InpaintMaskDataset(base, blob=1.0)


def test_entity_captions_name_the_masked_entity(shapes_root) -> None:
    from semani.data.inpaint_masks import InpaintMaskDataset
    from semani.data.shapes import ShapesWorldDataset
    from semani.data.shapes_generator import SIZE_WORDS

    base = ShapesWorldDataset(shapes_root, "train", 32, 40, deterministic=True)
    ds = InpaintMaskDataset(base, 1.0, "a photo of {word}", entity=1.0, box=0.0, stroke=0.0)
    torch.manual_seed(0)
    seen, sized = 0, set()
    for i in list(range(6)) * 4:
        s = ds[i]
        assert s["entity_caption"] is True and s["mask_kind"] == "entity"
        ents = base[i]["entity_masks"] >= 0.5
        (k,) = [j for j, e in enumerate(ents) if torch.equal(s["inpaint_mask"][0] > 0, e)]
        size, colour, name = base.entity_descriptions(i)[k].split()
        article = "an" if colour[0] in "aeiou" else "a"
        plain = f"a photo of {article} {colour} {name}"
        with_size = [f"a photo of a {w} {colour} {name}" for w in SIZE_WORDS[size]]
        assert s["caption"] in [plain, *with_size], s["caption"]
        sized.add(s["caption"] != plain)
        assert torch.equal(s["tokens"], base.tokenizer([s["caption"]])[0])
        seen += len(ents) > 1
    assert seen  # some images have several entities: the caption is the masked one's
    assert sized == {True, False}  # a size word half the time, as the captions
    union = InpaintMaskDataset(base, 1.0, entity=1.0, box=0.0, stroke=0.0, entity_union=1.0)
    boxes = InpaintMaskDataset(base, 1.0, entity=0.0, box=1.0, stroke=0.0)
    never = InpaintMaskDataset(base, 0.0, entity=1.0, box=0.0, stroke=0.0)
    for i in range(6):  # a union of several entities, a box, or probability 0: as written
        alone = len(base[i]["entity_masks"]) == 1  # a "union" of one entity is that entity
        for other, recaptioned in ((union, alone), (boxes, False), (never, False)):
            s = other[i]
            assert s["entity_caption"] is recaptioned
            assert (s["caption"] == base[i]["caption"]) is not recaptioned
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        InpaintMaskDataset(base, 1.5)
    with pytest.raises(ValueError, match="word"):
        InpaintMaskDataset(base, 0.5, "a photo of {name}")


def test_entity_captions_without_phrases_use_the_name() -> None:
    from semani.data.inpaint_masks import InpaintMaskDataset

    ents = entities()
    base = [{"image": torch.zeros(3, 16, 16), "caption": "a scene", "index": 0,
             "entity_masks": ents, "entity_names": ["elephant", "x", "dog"]}]  # fmt: skip
    ds = InpaintMaskDataset(base, 1.0, entity=1.0, box=0.0, stroke=0.0)
    captions = {ds[0]["caption"] for _ in range(12)}
    assert captions == {"an elephant", "a dog"}
