"""Table I metrics: IS, CLIP-score, R@N, L2 against references; DDP; weights; classifier."""

from __future__ import annotations

import math
import socket
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from semani.metrics import (
    ClipRecall,
    ClipScore,
    InceptionScore,
    L2Error,
    SeamDifference,
    ShapesClassifier,
    StackGANInceptionV3,
    Table1Metrics,
    TFInceptionV3,
    inception_score,
    load_clip,
    load_shapes_classifier,
    seam_difference,
)
from semani.metrics.classifiers import to_uint8


def _brute_is(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per consecutive part, then mean and population std."""
    p = np.exp(logits.double().numpy())
    p /= p.sum(axis=1, keepdims=True)
    n, scores = len(p), []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        p_y = part.mean(axis=0)
        kl = [sum(q[c] * math.log(q[c] / p_y[c]) for c in range(len(q))) for q in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _is_metric(logits: torch.Tensor, batches: int = 3, **kwargs) -> tuple[float, float]:
    metric = InceptionScore(nn.Identity(), **kwargs)  # "images" = the logits themselves
    for chunk in logits.chunk(batches):
        metric.update(chunk)
    mean, std = metric.compute()
    return float(mean), float(std)


# ------------------------------------------------------------------ Inception Score


def test_inception_score_equals_the_formula_and_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    torch.manual_seed(0)
    logits = 3 * torch.randn(43, 6)  # 43: parts of unequal size
    mean, std = _is_metric(logits, splits=10)
    assert (mean, std) == pytest.approx(_brute_is(logits, 10), rel=1e-9)
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)
    shuffled = _is_metric(logits, splits=10, shuffle_seed=2020)
    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert shuffled == pytest.approx(
        (ref["inception_score_mean"], ref["inception_score_std"]), rel=1e-9
    )
    assert shuffled != pytest.approx((mean, std), rel=1e-6)
    one = _is_metric(logits, splits=1)
    assert one[0] == pytest.approx(_brute_is(logits, 1)[0], rel=1e-9) and one[1] == 0


def test_inception_score_equals_torchmetrics_up_to_its_unbiased_std() -> None:
    from torchmetrics.image.inception import InceptionScore as TMInceptionScore

    torch.manual_seed(1)
    logits = 2 * torch.randn(40, 5)
    with pytest.warns(UserWarning):  # "will save all extracted features in buffer"
        tm = TMInceptionScore(feature=nn.Identity(), splits=10)
    tm.update(logits)
    torch.manual_seed(7)
    tm_mean, tm_std = tm.compute()  # a torch.randperm of the samples, then chunks
    torch.manual_seed(7)
    perm = torch.randperm(40)
    mean, std = _is_metric(logits[perm], splits=10)
    assert mean == pytest.approx(float(tm_mean), rel=1e-5)
    assert std == pytest.approx(float(tm_std) * math.sqrt(9 / 10), rel=1e-4)


def test_background_logit_is_dropped_before_the_softmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(20, 4)
    with_bg = torch.cat([torch.full((20, 1), 30.0), logits], dim=1)  # a dominant background
    dropped = _is_metric(with_bg, splits=2, drop_first_logit=True)
    assert dropped == pytest.approx(_brute_is(logits, 2), rel=1e-9)
    assert _is_metric(with_bg, splits=2)[0] == pytest.approx(1.0, abs=1e-6)  # p(y|x) = p(y)
    with pytest.raises(ValueError, match="needs >= 10 samples"):
        inception_score(logits[:5], splits=10)


def test_sample_ids_make_the_order_and_repeats_irrelevant() -> None:
    torch.manual_seed(3)
    logits = torch.randn(12, 5)
    metric = InceptionScore(nn.Identity(), splits=3)
    order = torch.tensor([5, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6, 5, 0])  # 5 and 0 twice (padding)
    for ids in order.split(4):
        metric.update(logits[ids], index=ids)
    mean, std = metric.compute()
    assert (float(mean), float(std)) == pytest.approx(_brute_is(logits, 3), rel=1e-9)
    metric.update(logits[:2])  # no ids after ids
    with pytest.raises(ValueError, match="pass index to every update"):
        metric.compute()


def test_stackgan_inception_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(4)
    net = inception_v3(weights=None, num_classes=3, aux_logits=False, init_weights=False).eval()
    torch.save(net.state_dict(), tmp_path / "birds.pth")
    clf = StackGANInceptionV3(tmp_path / "birds.pth", num_classes=2)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    x = F.interpolate(to_uint8(images).float(), size=(299, 299), mode="bilinear",
                      align_corners=False, antialias=True).round()  # fmt: skip
    with torch.no_grad():
        expected = net(x / 127.5 - 1)  # (2, 3)
        logits = clf(images)
    torch.testing.assert_close(logits, expected)
    clf.train()
    assert not clf.training and not clf.net.training  # frozen
    metric = InceptionScore(clf, splits=1, drop_first_logit=True)
    metric.update(images)
    assert float(metric.compute()[0]) == pytest.approx(_brute_is(expected[:, 1:], 1)[0], rel=1e-5)

    aux = inception_v3(weights=None, num_classes=21, aux_logits=True, init_weights=False)
    torch.save({"state_dict": aux.state_dict()}, tmp_path / "flowers.pth")
    assert StackGANInceptionV3(tmp_path / "flowers.pth", num_classes=20).net.AuxLogits is not None
    with pytest.raises(RuntimeError, match="21 outputs, expected"):
        StackGANInceptionV3(tmp_path / "flowers.pth", num_classes=50)


def test_tf_inception_reads_the_torch_fidelity_weights_from_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    # a random torch-fidelity Inception without downloading: build it with loading disabled
    with monkeypatch.context() as m:
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(5)
        random_net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"])
    random_net.eval()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_net.state_dict(), path)
    clf = TFInceptionV3(path)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits = clf(images)
        expected = random_net(to_uint8(images))[0]
    assert logits.shape == (1, 1008)
    torch.testing.assert_close(logits, expected)


# ------------------------------------------------------------------ missing weights


@pytest.mark.parametrize(
    "load, source",
    [
        (lambda p: TFInceptionV3(p), "torch-fidelity/releases/download/v0.2.0/weights-inception"),
        (lambda p: StackGANInceptionV3(p, 50), "StackGAN-inception-model"),
        (load_shapes_classifier, "experiment=classifier_shapes"),
        (lambda p: load_clip("RN50", p), "openaipublic.azureedge.net/clip/models/"),
        (lambda p: load_clip("semani-shapes-ViT", p), "experiment=clip_shapes"),
    ],
)
def test_missing_weights_name_the_file_and_its_source(tmp_path: Path, load, source: str) -> None:
    missing = tmp_path / "pretrained" / "weights.pt"
    with pytest.raises(FileNotFoundError) as err:
        load(missing)
    assert str(missing) in str(err.value) and source in str(err.value)


@pytest.mark.parametrize("dataset", ["cub", "oxford", "coco", "shapes"])
def test_metrics_configs_need_their_weights(dataset: str, tmp_path: Path) -> None:
    import hydra

    from tests.conftest import compose

    cfg = compose("train", [f"+metrics={dataset}", f"paths.root_dir={tmp_path}"], tmp_path)
    assert cfg.metrics._target_ == "semani.metrics.table1.Table1Metrics"
    with pytest.raises(Exception) as err:  # Hydra wraps the error of the target it calls
        hydra.utils.instantiate(cfg.metrics)
    cause = err.value if isinstance(err.value, FileNotFoundError) else err.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert str(tmp_path / "pretrained") in str(cause)


def test_shapes_metrics_config_builds_the_four_metrics(tmp_path: Path) -> None:
    import hydra
    import open_clip

    import semani.modules.clip  # noqa: F401  (registers semani-shapes-ViT with open_clip)
    from tests.conftest import compose

    pretrained = tmp_path / "pretrained"
    (pretrained / "classifier").mkdir(parents=True)
    (pretrained / "clip").mkdir()
    torch.save(ShapesClassifier().export(), pretrained / "classifier" / "shapes_classifier.pt")
    clip = open_clip.create_model("semani-shapes-ViT")
    torch.save(clip.state_dict(), pretrained / "clip" / "semani-shapes-ViT.pt")
    cfg = compose(
        "train",
        ["+metrics=shapes", f"paths.root_dir={tmp_path}", "metrics.recall_candidates=10"],
        tmp_path,
    )
    metrics = hydra.utils.instantiate(cfg.metrics)(caption_pool=CAPTIONS)
    assert isinstance(metrics, Table1Metrics) and metrics.recall.n_candidates == 10
    assert isinstance(metrics.inception_score.classifier, ShapesClassifier)
    assert metrics.clip_score.clip.model_name == "semani-shapes-ViT"


# ------------------------------------------------------------------ CLIP-score, R@N, L2


@pytest.fixture(scope="module")
def tiny_clip() -> nn.Module:
    from semani.modules.clip import TINY_CLIP_NAME

    torch.manual_seed(0)
    return load_clip(TINY_CLIP_NAME, None)


CAPTIONS = [f"a {c} {s} on a gray background" for c in ("red", "blue", "green", "pink", "black")
            for s in ("circle", "square", "star", "cross", "diamond", "hexagon")]  # fmt: skip


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_clip_score_equals_a_brute_force_computation(tiny_clip: nn.Module) -> None:
    torch.manual_seed(6)
    images = torch.rand(5, 3, 40, 48) * 2 - 1
    texts = CAPTIONS[:5]
    metric = ClipScore(tiny_clip)
    metric.update(images[:2], texts[:2])
    metric.update(images[2:], tiny_clip.tokenize(texts[2:]))  # token ids work too
    scores = []
    with torch.no_grad():
        for img, text in zip(images, texts):
            e = _unit(tiny_clip.model.encode_image(tiny_clip.preprocess(img[None])))
            t = _unit(tiny_clip.model.encode_text(tiny_clip.tokenize([text])))
            scores.append(100 * float((e * t).sum()))
    assert float(metric.compute()) == pytest.approx(sum(scores) / 5, rel=1e-4, abs=1e-4)


class FakeClip(nn.Module):
    """A deterministic stand-in for `ClipModel`: a fixed projection of the pooled image and a
    text embedding seeded by the caption's CRC (the same in every process)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, dim, generator=g))
        self.dim = dim

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.proj  # (B, dim)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts, normalize: bool = True) -> torch.Tensor:
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            rows.append(torch.randn(self.dim, generator=g))
        x = torch.stack(rows)  # (B, dim)
        return F.normalize(x, dim=-1) if normalize else x


def test_clip_score_keeps_negative_cosines() -> None:
    clip = FakeClip()
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    metric = ClipScore(clip)
    metric.update(images, ["a caption"])
    cos = float((clip.encode_image(images) * clip.encode_text(["a caption"])).sum())
    metric.update(-images, ["a caption"])  # the opposite image embedding: -cos
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-5)
    metric.reset()
    metric.update(-images if cos > 0 else images, ["a caption"])
    assert float(metric.compute()) == pytest.approx(-100 * abs(cos), rel=1e-5)


def test_recall_equals_a_brute_force_ranking(tiny_clip: nn.Module) -> None:
    torch.manual_seed(7)
    n, pool = 6, [*CAPTIONS, CAPTIONS[0]]  # the first target twice in the pool
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    targets = CAPTIONS[:n]
    index = torch.arange(100, 100 + n)
    metric = ClipRecall(tiny_clip, pool, ks=(1, 3, 10), n_candidates=10, seed=3)
    metric.update(images[:4], targets[:4], index[:4])
    metric.update(images[4:], targets[4:], index[4:])
    ranks = []
    with torch.no_grad():
        for img, target, i in zip(images, targets, index.tolist()):
            neg = metric.negatives(target, i)
            assert len(set(neg.tolist())) == 9 and all(pool[j] != target for j in neg)
            candidates = [target] + [pool[j] for j in neg]
            e = _unit(tiny_clip.model.encode_image(tiny_clip.preprocess(img[None])))[0]
            sims = [float(e @ _unit(tiny_clip.model.encode_text(tiny_clip.tokenize([c])))[0])
                    for c in candidates]  # fmt: skip
            ranks.append(sum(s > sims[0] for s in sims[1:]))
    got = metric.compute()
    for k in (1, 3, 10):
        assert float(got[f"r{k}"]) == pytest.approx(100 * sum(r < k for r in ranks) / n)
    assert float(got["r10"]) == 100.0
    # the draws depend on (seed, index) only: the same for another batching, new for new ids
    assert np.array_equal(metric.negatives(targets[1], 101), metric.negatives(targets[1], 101))
    assert not np.array_equal(metric.negatives(targets[1], 101), metric.negatives(targets[1], 7))
    with pytest.raises(ValueError, match="ids"):
        metric.update(images[:1], targets[:1], None)
    with pytest.raises(ValueError, match="fewer than"):
        ClipRecall(tiny_clip, CAPTIONS[:5], n_candidates=10)


def test_l2_equals_the_formula() -> None:
    torch.manual_seed(8)
    inputs, outputs = torch.rand(5, 3, 8, 8) * 2 - 1, torch.rand(5, 3, 8, 8) * 2 - 1
    metric = L2Error()
    metric.update(inputs[:3], outputs[:3])
    metric.update(inputs[3:], outputs[3:])
    expected = (((outputs + 1) / 2 - (inputs + 1) / 2) ** 2).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        metric.update(inputs, outputs[:, :, :4])


def _seam_loop(image: np.ndarray, mask: np.ndarray) -> float:
    """The seam by its definition: every 4-neighbour pair across the border, one at a time."""
    diffs = []
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (1, 0)):
                v, u = y + dy, x + dx
                if v < h and u < w and mask[y, x] != mask[v, u]:
                    diffs.append(np.abs(image[:, y, x] - image[:, v, u]).mean() / 2)
    return float(np.mean(diffs)) if diffs else math.nan


def test_seam_equals_its_definition() -> None:
    torch.manual_seed(3)
    images = torch.rand(3, 3, 9, 11) * 2 - 1
    masks = torch.zeros(3, 9, 11, dtype=torch.bool)
    masks[0, 2:6, 3:8] = True
    masks[1, :, :4] = True  # touches the image's edges: only the inner side is a border
    masks[1, 7, 9] = True
    # masks[2] empty: no border, NaN, left out of the mean
    got = seam_difference(images, masks)
    for k in range(3):
        want = _seam_loop(images[k].double().numpy(), masks[k].numpy())
        assert (math.isnan(want) and math.isnan(got[k])) or got[k] == pytest.approx(want)
    flat = torch.zeros(1, 3, 9, 11)  # a uniform image has no seam wherever the mask is
    assert float(seam_difference(flat, masks[:1])[0]) == 0.0

    metric = SeamDifference()
    outputs = images.clone()
    outputs[masks[:, None].expand_as(outputs)] = 1.0  # a hard white paste
    metric.update(images[:2], outputs[:2], masks[:2], index=torch.tensor([0, 1]))
    metric.update(images[2:], outputs[2:], masks[2:], index=torch.tensor([2]))
    seam, reference = metric.compute().tolist()
    assert reference == pytest.approx(float(seam_difference(images[:2], masks[:2]).mean()))
    assert seam == pytest.approx(float(seam_difference(outputs[:2], masks[:2]).mean()))
    assert seam > reference  # the paste shows
    with pytest.raises(ValueError, match="do not match"):
        seam_difference(images, masks[:, :4])


def test_table1_metrics_share_one_clip() -> None:
    from semani.modules.clip import TINY_CLIP_NAME

    torch.manual_seed(9)
    metrics = Table1Metrics(
        ShapesClassifier(), CAPTIONS, clip_model=TINY_CLIP_NAME, clip_pretrained=None,
        is_splits=2, recall_ks=(1, 5), recall_candidates=5,
    )  # fmt: skip
    assert metrics.clip_score.clip is metrics.recall.clip
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    metrics.update(images, CAPTIONS[:4], torch.arange(4))
    assert set(metrics.compute()) == {"is_mean", "is_std", "clip_score", "r1", "r5"}
    metrics.update_l2(images, images, torch.arange(4))
    assert metrics.compute()["l2"] == 0.0
    metrics.reset()
    assert metrics.compute() == {}


# ------------------------------------------------------------------ DDP: 1 rank == 2 ranks


def _ddp_data() -> dict:
    g = torch.Generator().manual_seed(10)
    n = 9
    return {
        "logits": torch.randn(n, 5, generator=g),
        "images": torch.rand(n, 3, 8, 8, generator=g) * 2 - 1,
        "outputs": torch.rand(n, 3, 8, 8, generator=g) * 2 - 1,
        "texts": CAPTIONS[:n],
    }


def _ddp_metrics() -> dict:
    clip = FakeClip()
    return {
        "is": InceptionScore(nn.Identity(), splits=3),
        "clip": ClipScore(clip),
        "recall": ClipRecall(clip, CAPTIONS, ks=(1, 5), n_candidates=8, seed=1),
        "l2": L2Error(),
    }


def _run_metrics(ids: list[int]) -> dict:
    data, metrics = _ddp_data(), _ddp_metrics()
    for chunk in torch.tensor(ids).split(2):
        texts = [data["texts"][i] for i in chunk]
        metrics["is"].update(data["logits"][chunk], index=chunk)
        metrics["clip"].update(data["images"][chunk], texts, index=chunk)
        metrics["recall"].update(data["images"][chunk], texts, chunk)
        metrics["l2"].update(data["images"][chunk], data["outputs"][chunk], index=chunk)
    out = {"is": torch.stack(metrics["is"].compute())}
    out["clip"] = metrics["clip"].compute()
    out["recall"] = torch.stack(list(metrics["recall"].compute().values()))
    out["l2"] = metrics["l2"].compute()
    return out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        ids = list(range(9)) + [0]  # a DistributedSampler's padding repeats sample 0
        torch.save(_run_metrics(ids[rank::world]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_ranks_give_the_single_process_results(tmp_path: Path) -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method (Linux)")
    single = _run_metrics(list(range(9)))
    # fork: the children share the parent's imports (spawning would re-import for seconds)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")  # fmt: skip
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in single.items():
            torch.testing.assert_close(got[key], value, msg=f"rank {rank}: {key}")


# ------------------------------------------------------------------ ShapesWorld classifier


def test_shapes_classifier_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(11)
    net = ShapesClassifier(num_classes=7, width=4).eval()
    images = torch.rand(2, 3, 48, 48) * 2 - 1  # resized to 64 inside
    torch.save(net.export(), tmp_path / "shapes_classifier.pt")
    loaded = load_shapes_classifier(tmp_path / "shapes_classifier.pt")
    loaded.train()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), net(images))
    assert loaded(images).shape == (2, 7)


def test_classifier_labels_come_from_the_image_keys(shapes_root: Path) -> None:
    from torch.utils.data import Subset

    from semani.data.shapes import ShapesWorldDataset
    from semani.data.shapes_generator import SHAPES
    from semani.models.classifier_module import dataset_labels

    ds = ShapesWorldDataset(shapes_root, split="test", image_size=64, context_length=40)
    labels = dataset_labels(Subset(ds, [1, 3]))  # through the wrapper, indexed like the reader
    assert labels.tolist() == [SHAPES.index(k.split("/")[0].split(".")[1]) for k in ds.keys]


def test_classifier_shapes_fast_dev_run(shapes_root: Path, tmp_path: Path) -> None:
    """`train.py experiment=classifier_shapes debug=fdr`, and its checkpoint loads."""
    from semani.tasks.train import train
    from tests.conftest import compose

    cfg = compose(
        "train",
        ["experiment=classifier_shapes", f"data.root={shapes_root}", "data.batch_size=4",
         "data.num_workers=0", "extras.print_config=false", "debug=fdr"],
        tmp_path,
    )  # fmt: skip
    metrics, objects = train(cfg)
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert math.isfinite(metrics[key]), key
    assert not (tmp_path / "classifier").exists()  # no export in fast_dev_run
    module = objects["model"]
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded = load_shapes_classifier(tmp_path / "last.ckpt")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module.net.eval()(images))
