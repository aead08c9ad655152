"""Entity-crop data and OVSeg's mask-prompt tuning (`experiment=mask_prompt_shapes`)."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch

import semani
from semani.data.base import collate_samples
from semani.data.cub import CUBDataset
from semani.data.datamodule import SemaniDataModule
from semani.data.entity_crops import EntityCropDataset, NoEntitiesError
from semani.data.shapes import ShapesWorldDataset
from semani.data.shapes_generator import SHAPES
from semani.models.mask_prompt_module import MaskPromptTuningModule
from semani.modules.mask_clip import MaskPromptCLIP
from semani.tasks.train import train
from semani.utils.checkpoint import CheckpointMismatchError
from semani.utils.masks import masked_crops
from tests.conftest import compose

SHAPES_CLIP = "semani-shapes-ViT"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ShapesWorld CLIP saved as open_clip weights (what clip_shapes exports)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.pt"
    torch.save(open_clip.create_model(SHAPES_CLIP).state_dict(), path)
    return path


def test_entity_crops_cut_the_entity_and_caption_its_name(shapes_root: Path) -> None:
    base = ShapesWorldDataset(shapes_root, "test", 64, 40)  # deterministic
    crops = EntityCropDataset(base)
    for i in range(4):
        s, c = base[i], crops[i]
        masks = s["entity_masks"] > 0.5
        k = [j for j in range(len(masks)) if masks[j].any()][i % len(masks)]
        want, want_mask, _ = masked_crops(s["image"], masks[k : k + 1], (64, 64), crops.fill)
        torch.testing.assert_close(c["image"], want[0].clamp(-1, 1))
        torch.testing.assert_close(c["crop_mask"], want_mask[0])
        assert c["entity_name"] == s["entity_names"][k]
        assert c["caption"] == f"a photo of a {s['entity_names'][k]}."
        assert torch.equal(c["tokens"], base.tokenizer([c["caption"]])[0])
    # the background outside the entity is the CLIP mean colour (bicubic blurs the seam)
    c = next(crops[i] for i in range(len(crops)) if (crops[i]["crop_mask"] < 0.5).any())
    outside = c["crop_mask"] < 0.5
    mean = 2 * torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN) - 1
    torch.testing.assert_close(c["image"][:, outside].median(1).values, mean, atol=0.01, rtol=0)
    batch = collate_samples([crops[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["crop_mask"].shape == (3, 64, 64)
    assert all(n in SHAPES for n in batch["entity_name"])


def test_entity_crops_descriptions_and_mixing(shapes_root: Path) -> None:
    base = ShapesWorldDataset(shapes_root, "train", 64, 40)
    torch.manual_seed(0)
    described = EntityCropDataset(base, describe_prob=1.0)
    caps = [described[i]["caption"] for i in range(6)]
    descriptions = {d for i in range(len(base)) for d in base.entity_descriptions(i)}
    assert all(c[len("a photo of a ") : -1] in descriptions for c in caps)
    mixed = EntityCropDataset(base, crop_prob=0.5)
    samples = [mixed[i % len(base)] for i in range(40)]
    assert all(set(s) == {"image", "caption", "tokens", "index"} for s in samples)
    n_crops = sum(s["caption"].startswith("a photo of a ") for s in samples)
    assert 5 < n_crops < 35  # both kinds are served
    with pytest.raises(ValueError, match="crop_prob"):
        EntityCropDataset(base, crop_prob=1.5)


def test_entity_crops_with_entities_carry_masks_and_names_for_both_kinds(shapes_root) -> None:
    base = ShapesWorldDataset(shapes_root, "train", 64, 40)
    mixed = EntityCropDataset(base, crop_prob=0.5, with_entities=True)
    torch.manual_seed(0)
    samples = [mixed[i % len(base)] for i in range(30)]
    crops = [s for s in samples if s["caption"].startswith("a photo of a ")]
    scenes = [s for s in samples if not s["caption"].startswith("a photo of a ")]
    assert crops and scenes
    for s in crops:  # the crop's own mask (where its pixels are not the fill) and name
        assert s["entity_masks"].shape == (1, 64, 64) and s["entity_names"][0] in s["caption"]
        assert (
            s["entity_masks"].sum() > 0 and s["caption"] == f"a photo of a {s['entity_words'][0]}."
        )
    for s in scenes:  # the image's own entities
        whole = base[s["index"]]
        assert s["entity_names"] == whole["entity_names"] == s["entity_words"]  # describe_prob 0
        assert torch.equal(s["entity_masks"], whole["entity_masks"])
    described = EntityCropDataset(base, crop_prob=0.0, describe_prob=1.0, with_entities=True)
    assert described[2]["entity_words"] == base.entity_descriptions(2)
    batch = collate_samples(samples[:4])
    assert isinstance(batch["entity_masks"], list) and len(batch["entity_names"]) == 4


def test_entity_crops_in_place_keep_the_entity_where_it_is(shapes_root: Path) -> None:
    base = ShapesWorldDataset(shapes_root, "train", 64, 40, deterministic=True)
    crops = EntityCropDataset(base, in_place_prob=1.0, deterministic=False)
    torch.manual_seed(0)
    sample = crops[3]
    mask = sample["crop_mask"] > 0.5  # (64, 64): one of image 3's entity masks, not resized
    whole = base[3]
    k = [i for i, m in enumerate(whole["entity_masks"] > 0.5) if torch.equal(m, mask)]
    assert len(k) == 1, "the crop mask is one entity's own mask at its own place"
    assert sample["caption"] == f"a photo of a {whole['entity_names'][k[0]]}."
    assert torch.equal(sample["image"][:, mask], whole["image"][:, mask])  # the entity as it is
    outside = sample["image"][:, ~mask]  # every other pixel is the fill colour
    assert torch.allclose(outside, crops.fill.view(3, 1).expand_as(outside))
    evaluation = EntityCropDataset(base, in_place_prob=1.0)  # deterministic: boxes as before
    assert not torch.equal(evaluation[3]["crop_mask"], sample["crop_mask"])
    with pytest.raises(ValueError, match="in_place_prob"):
        EntityCropDataset(base, in_place_prob=-0.1)


def test_entity_crops_need_entities(tmp_path: Path, shapes_root: Path) -> None:
    cub = CUBDataset.__new__(CUBDataset)  # a reader without entity masks
    with pytest.raises(NoEntitiesError, match="shapes"):
        EntityCropDataset(cub)
    with pytest.raises(ValueError, match="unknown data.entity_crops keys"):
        SemaniDataModule("shapes", str(shapes_root), entity_crops={"crop_probability": 1.0})


def test_datamodule_wraps_eval_splits_only_when_asked(shapes_root: Path) -> None:
    kw = dict(dataset="shapes", root=str(shapes_root), image_size=64, context_length=40,
              num_workers=0, batch_size=4)  # fmt: skip
    dm = SemaniDataModule(**kw, entity_crops={"crop_prob": 0.5})
    dm.setup("fit")
    assert isinstance(dm.data_train, EntityCropDataset)
    assert isinstance(dm.data_val, ShapesWorldDataset)
    dm = SemaniDataModule(**kw, entity_crops={"crop_prob": 1.0, "eval": True})
    dm.setup("fit")
    assert isinstance(dm.data_val, EntityCropDataset) and dm.data_val.deterministic
    batch = next(iter(dm.val_dataloader()))
    assert batch["crop_mask"].shape == (4, 64, 64)


def _module(clip_file: Path, **kw) -> MaskPromptTuningModule:
    torch.manual_seed(0)
    return MaskPromptTuningModule(list(SHAPES), SHAPES_CLIP, str(clip_file), **kw)


def _crop_batch(shapes_root: Path, n: int = 8) -> dict:
    base = ShapesWorldDataset(shapes_root, "train", 64, 40, deterministic=True)
    crops = EntityCropDataset(base)
    return collate_samples([crops[i] for i in range(n)])


@pytest.mark.parametrize("loss", ["vocabulary", "clip"])
def test_tuning_changes_only_the_mask_prompt_and_lowers_the_loss(
    clip_file: Path, shapes_root: Path, loss: str
) -> None:
    module = _module(clip_file, loss=loss, lr=0.05)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["model.mask_embedding"]
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = _crop_batch(shapes_root)
    opt = torch.optim.AdamW(module.model.trainable_parameters(), lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(15):
        value, _ = module.step(batch)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < losses[0], losses
    after = module.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.mask_embedding"]


def test_vocabulary_loss_is_cross_entropy_over_the_prompts(
    clip_file: Path, shapes_root: Path
) -> None:
    module = _module(clip_file, loss="vocabulary")
    with torch.no_grad():
        module.model.mask_embedding.normal_(0, 0.1)
    batch = _crop_batch(shapes_root, 5)
    loss, acc = module.step(batch)
    clip = module.model.clip
    text = clip.encode_text([f"a photo of a {w}." for w in SHAPES])  # (7, D)
    emb = module.model.encode_masked(batch["image"], batch["crop_mask"])  # (5, D)
    logits = clip.model.logit_scale.exp() * emb @ text.T
    labels = torch.tensor([SHAPES.index(n) for n in batch["entity_name"]])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert float(acc) == float((logits.argmax(1) == labels).float().mean())
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        module.labels(["circle", "dragon"])


def test_exported_prompt_loads_for_its_clip_only(clip_file: Path, tmp_path: Path) -> None:
    module = _module(clip_file)
    with torch.no_grad():
        module.model.mask_embedding.normal_()
    out = module.export_mask_prompt(tmp_path / "mp" / "mask_prompt.pt")
    assert not list(out.parent.glob("*.tmp"))
    scorer_clip = MaskPromptCLIP(SHAPES_CLIP, str(clip_file), mask_prompt=str(out))
    assert torch.equal(scorer_clip.mask_embedding, module.model.mask_embedding)
    torch.manual_seed(1)
    other = tmp_path / "other_clip.pt"
    torch.save(open_clip.create_model(SHAPES_CLIP).state_dict(), other)
    with pytest.raises(CheckpointMismatchError, match="was tuned with the CLIP"):
        MaskPromptCLIP(SHAPES_CLIP, str(other), mask_prompt=str(out))
    with pytest.raises(CheckpointMismatchError, match="depth"):
        MaskPromptCLIP(SHAPES_CLIP, str(clip_file), depth=2, mask_prompt=str(out))
    with pytest.raises(CheckpointMismatchError, match="no 'mask_embedding'"):
        MaskPromptCLIP(SHAPES_CLIP, str(clip_file), mask_prompt=str(other))


def test_mask_prompt_shapes_fast_dev_run(
    clip_file: Path, shapes_root: Path, tmp_path: Path
) -> None:
    cfg = compose(
        "train",
        ["experiment=mask_prompt_shapes", f"model.pretrained={clip_file}",
         f"data.root={shapes_root}", "data.batch_size=4", "data.num_workers=0",
         "extras.print_config=false", "debug=fdr"],
        tmp_path,
    )  # fmt: skip
    metrics, objects = train(cfg)
    for key in ("train/loss", "val/acc", "test/acc"):
        assert math.isfinite(metrics[key]), key
    assert not (tmp_path / "mask_prompt").exists()  # no export in fast_dev_run


def test_two_steps_export_and_load_model(
    clip_file: Path, shapes_root: Path, tmp_path: Path
) -> None:
    cfg = compose(
        "train",
        ["experiment=mask_prompt_shapes", f"model.pretrained={clip_file}",
         f"data.root={shapes_root}", "data.batch_size=4", "data.num_workers=0",
         "trainer.max_epochs=-1", "trainer.max_steps=2", "validate_first=false", "test=false",
         "extras.print_config=false"],
        tmp_path,
    )  # fmt: skip
    _, objects = train(cfg)
    trained = objects["model"].model.mask_embedding
    assert trained.abs().sum() > 0  # moved from OVSeg's zeros
    exported = torch.load(tmp_path / "mask_prompt" / "mask_prompt.pt", weights_only=True)
    assert torch.equal(exported["mask_embedding"], trained.detach().cpu())
    assert exported["vocabulary"] == list(SHAPES)
    loaded = semani.load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, MaskPromptTuningModule) and not loaded.training
    assert torch.equal(loaded.model.mask_embedding, trained.detach().cpu())
