"""Training a CLIP on ShapesWorld: FILIP loss, patch/token features, module, export, loading."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import semani
from semani.data.shapes import ShapesWorldDataset
from semani.data.tokenizer import TextTokenizer
from semani.models.clip_module import ClipTrainModule, export_open_clip, recall_at_k
from semani.modules.clip import TINY_CLIP_NAME, ClipModel
from semani.modules.clip_tokens import (
    encode_image_with_patches,
    patch_features,
    text_token_mask,
    token_features,
)
from semani.modules.filip import FilipLoss, filip_similarity
from semani.tasks.train import train
from tests.conftest import compose

SHAPES_CLIP = "semani-shapes-ViT"
CONTEXT = 40  # semani-shapes-ViT's context length


def _batch(root: Path, n: int = 8) -> dict[str, torch.Tensor]:
    ds = ShapesWorldDataset(root, split="train", image_size=64, context_length=CONTEXT,
                            deterministic=True)  # fmt: skip
    samples = [ds[i] for i in range(n)]
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (n, 3, 64, 64)
        "tokens": torch.stack([s["tokens"] for s in samples]),  # (n, 40)
    }


# ------------------------------------------------------------------ FILIP loss


def test_filip_loss_equals_a_hand_computation_and_ignores_padding() -> None:
    torch.manual_seed(0)
    B, N, L, D = 3, 4, 5, 6
    x = F.normalize(torch.randn(B, N, D), dim=-1)
    y = F.normalize(torch.randn(B, L, D), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    scale = torch.tensor(7.0)

    def hand(y: torch.Tensor) -> float:
        s_i2t = [[0.0] * B for _ in range(B)]
        s_t2i = [[0.0] * B for _ in range(B)]
        for i in range(B):
            for j in range(B):
                valid = [t for t in range(L) if mask[j, t]]
                sim = [[float(x[i, n] @ y[j, t]) for t in valid] for n in range(N)]
                s_i2t[i][j] = sum(max(row) for row in sim) / N
                s_t2i[i][j] = sum(max(sim[n][c] for n in range(N)) for c in range(len(valid)))
                s_t2i[i][j] /= len(valid)

        def ce(rows: list[list[float]]) -> float:
            return sum(
                -(7.0 * r[k]) + math.log(sum(math.exp(7.0 * v) for v in r))
                for k, r in enumerate(rows)
            ) / len(rows)

        t2i_rows = [[s_t2i[i][j] for i in range(B)] for j in range(B)]  # per text, over images
        return (ce(s_i2t) + ce(t2i_rows)) / 2

    loss = FilipLoss()(x, y, mask, scale)
    assert loss.item() == pytest.approx(hand(y), rel=1e-5)
    y2 = y.clone()
    y2[1, 3:] = F.normalize(torch.randn(2, D), dim=-1)  # change padding only
    y2[2, 2:] = -y2[2, 2:]
    assert FilipLoss()(x, y2, mask, scale).item() == pytest.approx(loss.item(), rel=1e-6)
    y2[0, 4] = -y2[0, 4]  # a real token: the loss moves
    assert FilipLoss()(x, y2, mask, scale).item() != pytest.approx(loss.item(), rel=1e-4)
    # chunked = unchunked
    full = filip_similarity(x, y, mask)
    chunked = filip_similarity(x, y, mask, chunk_size=2)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least one"):
        filip_similarity(x, y, torch.zeros(B, L, dtype=torch.bool))


def test_recall_at_k() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.2, 0.4], [0.1, 0.2, 0.3]])
    assert recall_at_k(sim, (1, 2)) == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}


# ------------------------------------------------------------------ patch and token features


def test_patch_and_token_features_drop_the_class_token_and_padding() -> None:
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME).eval()  # 32 px, patch 8, ctx 77
    images = torch.randn(2, 3, 32, 32)
    tokens = TextTokenizer(77)(["a red circle", "a blue square on a green background"])
    with torch.no_grad():
        patches = patch_features(model, images)
        feats = token_features(model, tokens)
        pooled, _ = encode_image_with_patches(model, images)
        encoded = model.encode_image(images)
        visual = model.visual
        out = visual.forward_intermediates(
            images, indices=1, normalize_intermediates=True, output_fmt="NLC",
            output_extra_tokens=True,
        )  # fmt: skip
        cls = out["image_intermediates_prefix"][-1][:, 0] @ visual.proj  # (B, D)
        text = model.encode_text(tokens)
    D = encoded.shape[-1]
    assert patches.shape == (2, 16, D) and feats.shape == (2, 77, D)
    torch.testing.assert_close(pooled, encoded)
    # the global embedding is the projected class token, which the patches do not contain
    torch.testing.assert_close(cls, encoded)
    assert not any(torch.allclose(patches[:, n], encoded, atol=1e-4) for n in range(16))
    assert not torch.allclose(patches.mean(dim=1), encoded, atol=1e-3)
    # the pooled text embedding is the EOT position's token feature
    eot = tokens.argmax(dim=-1)
    torch.testing.assert_close(feats[torch.arange(2), eot], text)
    mask = text_token_mask(tokens)
    assert mask.sum(dim=1).tolist() == (eot + 1).tolist()
    # ClipModel's own patch tokens are the same features
    clip = ClipModel(TINY_CLIP_NAME)
    clip.model.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = patch_features(clip.model, clip.preprocess(x), normalize=True)
    torch.testing.assert_close(ours, clip.encode_image_tokens(x))


# ------------------------------------------------------------------ the module


def test_clip_loss_equals_open_clips(shapes_root: Path) -> None:
    torch.manual_seed(0)
    module = ClipTrainModule(SHAPES_CLIP, loss="clip").eval()
    batch = _batch(shapes_root, 4)
    with torch.no_grad():
        ours = module.compute_loss(module.features(batch))
        img, txt, scale = module.model(module.preprocess(batch["image"]), batch["tokens"])
        theirs = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="data.context_length=40"):
        module.features({"image": batch["image"], "tokens": batch["tokens"][:, :32]})


@pytest.mark.parametrize("loss", ["clip", "filip"])
def test_overfits_eight_pairs(shapes_root: Path, loss: str) -> None:
    torch.manual_seed(0)
    module = ClipTrainModule(SHAPES_CLIP, loss=loss)
    batch = _batch(shapes_root, 8)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        value = module.compute_loss(module.features(batch))
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.6 * losses[0], losses  # ln(8) = 2.08 -> about 0.7-1.0


def test_entity_word_scores_equal_the_token_wise_scorers(tmp_path: Path, shapes_root) -> None:
    """The region-word loss reads the very scores that `TokenWiseScorer` selects with."""
    from semani.alignment import EntityProposals, TokenWiseScorer

    torch.manual_seed(0)
    module = ClipTrainModule(SHAPES_CLIP, loss="filip", dense_loss_weight=1.0).eval()
    file = tmp_path / "clip.pt"
    torch.save(module.open_clip_state_dict(), file)
    scorer = TokenWiseScorer(SHAPES_CLIP, str(file), min_cells=0)
    sample = ShapesWorldDataset(shapes_root, "train", 64, CONTEXT, deterministic=True)[0]
    masks = sample["entity_masks"]  # (K, 64, 64)
    words = ["circle", "square", "triangle"]
    with torch.no_grad():
        patches = module.features({"image": sample["image"][None], "tokens":
                                   sample["tokens"][None]})["patches"]  # fmt: skip
        got = module.entity_word_scores(patches, [masks], words)[0]  # (K, 3)
    proposals = EntityProposals(masks > 0.5, torch.ones(len(masks)))
    for v, word in enumerate(words):
        want = scorer(sample["image"], proposals, word)
        torch.testing.assert_close(got[:, v], want, atol=1e-5, rtol=0)


def _dense_reference(module, patches, masks, words: list[list[str]]) -> torch.Tensor:
    """The region-word loss written out: CE over the batch's words for each entity, averaged
    with CE over the image's entities for each word that occurs once in its image."""
    vocab = sorted({w for ws in words for w in ws})
    scores = module.entity_word_scores(patches, masks, vocab)
    scale = module.model.logit_scale.exp()
    rows = torch.cat(scores)  # every entity against every word of the batch
    targets = torch.tensor([vocab.index(w) for ws in words for w in ws])
    per_word = [
        F.cross_entropy(scale * sc[:, vocab.index(w)], torch.tensor(k))
        for sc, ws in zip(scores, words) for k, w in enumerate(ws)
        if len(ws) > 1 and ws.count(w) == 1
    ]  # fmt: skip
    assert per_word
    return 0.5 * (F.cross_entropy(scale * rows, targets) + torch.stack(per_word).mean())


def test_dense_loss_is_the_two_cross_entropies_and_learns(shapes_root: Path) -> None:
    torch.manual_seed(0)
    module = ClipTrainModule(SHAPES_CLIP, loss="filip", dense_loss_weight=1.0)
    ds = ShapesWorldDataset(shapes_root, "train", 64, CONTEXT, deterministic=True)
    samples = [ds[i] for i in range(6)]
    batch = {"image": torch.stack([s["image"] for s in samples]),
             "tokens": torch.stack([s["tokens"] for s in samples]),
             "entity_masks": [s["entity_masks"] for s in samples],
             "entity_names": [s["entity_names"] for s in samples]}  # fmt: skip
    patches = module.features(batch)["patches"]
    want = _dense_reference(module, patches, batch["entity_masks"], batch["entity_names"])
    torch.testing.assert_close(module.dense_loss(patches, batch), want)
    # entity_words (names or descriptions) take the names' place
    words = [ds.entity_descriptions(i) for i in range(6)]
    want = _dense_reference(module, patches, batch["entity_masks"], words)
    torch.testing.assert_close(module.dense_loss(patches, {**batch, "entity_words": words}), want)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        value = module.dense_loss(module.features(batch)["patches"], batch)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.7 * losses[0], losses
    with pytest.raises(ValueError, match="with_entities=true"):
        module.dense_loss(patches, {"image": batch["image"]})


def test_clip_shapes_fast_dev_run(shapes_root: Path, tmp_path: Path) -> None:
    """`train.py experiment=clip_shapes debug=fdr` (the FILIP loss runs in the export test)."""
    cfg = compose(
        "train",
        ["experiment=clip_shapes", f"data.root={shapes_root}", "data.batch_size=4",
         "data.num_workers=0", "extras.print_config=false", "debug=fdr"],
        tmp_path,
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert objects["model"].model.visual.grid_size == (8, 8)
    for key in ("train/loss", "val/loss", "val/r1", "val/r5", "test/r1", "test/r5"):
        assert math.isfinite(metrics[key]), key
    assert not (tmp_path / "clip").exists()  # no export in fast_dev_run


def test_export_loads_with_open_clip_and_clip_model(shapes_root: Path, tmp_path: Path) -> None:
    """Two FILIP steps through train(); the exported file gives the module's embeddings."""
    cfg = compose(
        "train",
        ["experiment=clip_shapes", f"data.root={shapes_root}", "data.batch_size=4",
         "model.loss=filip",
         "data.num_workers=0", "trainer.max_steps=2", "validate_first=false", "test=false",
         "callbacks.model_checkpoint.every_n_train_steps=2", "extras.print_config=false"],
        tmp_path,
    )  # fmt: skip
    train(cfg)
    exported = tmp_path / "clip" / "open_clip_model.pt"
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert exported.is_file() and last.is_file()

    module = semani.load_model(last)  # registered by semani.models.clip_module
    assert isinstance(module, ClipTrainModule) and not module.training
    assert module.hparams.loss == "filip"
    again = export_open_clip(last, tmp_path / "again.pt")
    a, b = torch.load(exported, weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    oc = open_clip.create_model(SHAPES_CLIP, pretrained=str(exported)).eval()
    clip = ClipModel(SHAPES_CLIP, pretrained=str(exported))
    batch = _batch(shapes_root, 3)
    with torch.no_grad():
        f = module.features(batch)
        torch.testing.assert_close(
            oc.encode_image(module.preprocess(batch["image"]), normalize=True), f["image"]
        )
        torch.testing.assert_close(oc.encode_text(batch["tokens"], normalize=True), f["text"])
        torch.testing.assert_close(clip.encode_image(batch["image"]), f["image"])
        torch.testing.assert_close(clip.encode_text(batch["tokens"]), f["text"])
        torch.testing.assert_close(clip.encode_image_tokens(batch["image"]), f["patches"])
