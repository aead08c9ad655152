"""SemaniTransModule: frozen parts, gradients, vision guidance, Lightning training, checkpoints,
the warm-up + plateau LR schedule, image logging and the model configs."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision.transforms.functional import rgb_to_grayscale

from semani.data.base import collate_samples
from semani.data.shapes import ShapesWorldDataset
from semani.models.semani_trans import SemaniTransModule
from semani.models.vqgan import VQGANModule
from semani.modules.clip import TINY_CLIP_NAME, ClipModel
from semani.modules.gpt import GPTConfig
from semani.utils.lr_schedule import warmup_plateau_schedulers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
# 64 px -> 8x8 tokens (f8), 64 codes: smaller than vqgan_tiny.yaml (f4) to keep the tests fast
VQ = {
    "n_embed": 64,
    "embed_dim": 16,
    "ddconfig": {
        "double_z": False, "z_channels": 32, "resolution": 64, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0,
    },
}  # fmt: skip
GPT = {"n_layer": 2, "n_head": 4, "n_embd": 64, "image_vocab_size": 64, "text_len": 32,
       "image_len": 64}  # fmt: skip
CLIP = {"model_name": TINY_CLIP_NAME}


def make_module(**kw: Any) -> SemaniTransModule:
    torch.manual_seed(0)
    args: dict[str, Any] = {"gpt": GPT, "vqgan": {"config": VQ}, "clip": CLIP, "vg_prob": 0.5}
    args.update(kw)
    return SemaniTransModule(**args)


@pytest.fixture(scope="module")
def batch(shapes_root: Path) -> dict[str, Any]:
    ds = ShapesWorldDataset(shapes_root, "train", image_size=64, context_length=32,
                            deterministic=True)  # fmt: skip
    return collate_samples([ds[i] for i in range(4)])


@pytest.fixture(scope="module")
def module() -> SemaniTransModule:
    return make_module()


def _trainer(tmp_path: Path, max_steps: int, **kw: Any) -> pl.Trainer:
    args = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(tmp_path), log_every_n_steps=1,
    )  # fmt: skip
    args.update(kw)
    return pl.Trainer(**args)


def _loader(batch: dict[str, Any], n: int) -> DataLoader:
    return DataLoader([batch] * n, batch_size=None)


class Record(pl.Callback):
    """Records a logged metric and the LR at every training step; checks frozen parts' mode."""

    def __init__(self, key: str = "train/loss_img") -> None:
        self.key, self.values, self.lrs = key, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        for name in ("vqgan", "clip"):  # the frozen parts are in eval mode during training
            part = getattr(pl_module, name, None)
            assert part is None or not any(m.training for m in part.modules()), name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.key in trainer.callback_metrics:
            self.values.append(float(trainer.callback_metrics[self.key]))


# ---------------------------------------------------------------- construction


def test_clear_errors_for_bad_configuration() -> None:
    with pytest.raises(ValueError, match="taming_ckpt.*ckpt_path.*config"):
        SemaniTransModule(GPT, vqgan=None, clip=CLIP)
    with pytest.raises(ValueError, match="not both"):
        SemaniTransModule(GPT, {"taming_ckpt": "a", "taming_config": "b", "ckpt_path": "c"}, CLIP)
    with pytest.raises(ValueError, match="both vqgan.taming_ckpt and vqgan.taming_config"):
        SemaniTransModule(GPT, {"taming_ckpt": "a"}, CLIP)
    with pytest.raises(ValueError, match="unknown vqgan keys"):
        SemaniTransModule(GPT, {"ckpt": "a"}, CLIP)
    with pytest.raises(ValueError, match="image_vocab_size=64"):
        SemaniTransModule({**GPT, "image_vocab_size": 32}, {"config": VQ}, CLIP)
    with pytest.raises(ValueError, match="needs a CLIP"):
        SemaniTransModule(GPT, {"config": VQ}, clip=None, lambda_sem=5.0)
    with pytest.raises(ValueError, match="vg_prob"):
        SemaniTransModule(GPT, {"config": VQ}, CLIP, vg_prob=1.5)
    with pytest.raises(ValueError, match="gpt.text_pad_targets=true"):
        SemaniTransModule(GPT, {"config": VQ}, CLIP, text_loss="all_positions")
    no_clip = SemaniTransModule(GPT, {"config": VQ}, clip=None, lambda_sem=0.0)
    assert no_clip.clip is None


def test_frozen_parts_stay_frozen_and_out_of_the_optimizer(module: SemaniTransModule) -> None:
    module.train()
    assert module.gpt.training and not module.vqgan.training and not module.clip.training
    assert not any(m.training for m in module.vqgan.modules())
    assert not any(p.requires_grad for p in module.vqgan.parameters())
    assert not any(p.requires_grad for p in module.clip.parameters())
    opt = module.configure_optimizers()
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in module.gpt.parameters()}
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(p) for p in module.gpt.parameters() if p.dim() >= 2}
    assert opt.defaults["lr"] == 5e-4 and opt.defaults["betas"] == (0.9, 0.96)
    # without vision guidance [BOV] is never used: frozen, so DDP needs no unused-param search
    step1 = make_module(vg_prob=0.0)
    ids = {id(p) for g in step1.configure_optimizers().param_groups for p in g["params"]}
    assert ids == {id(p) for n, p in step1.gpt.named_parameters() if n != "bov"}


def test_semantic_loss_gradient_reaches_the_transformer(
    module: SemaniTransModule, batch: dict[str, Any]
) -> None:
    module.zero_grad()
    losses = module._losses(batch, None, noise=True)
    losses["loss_sem"].backward()  # the semantic term alone
    grads = {n: p.grad for n, p in module.gpt.named_parameters()}
    assert grads["image_head.weight"] is not None and grads["image_head.weight"].abs().sum() > 0
    block_grads = [g for n, g in grads.items() if n.startswith("blocks.") and g is not None]
    assert block_grads and sum(g.abs().sum() for g in block_grads) > 0
    frozen = list(module.vqgan.parameters()) + list(module.clip.parameters())
    assert all(p.grad is None for p in frozen)
    module.zero_grad()


def test_vision_guidance_only_on_the_chosen_samples(
    module: SemaniTransModule, batch: dict[str, Any]
) -> None:
    use = module.choose_gray(4, torch.device("cpu"))
    assert use is not None and int(use.sum()) == 2  # round(0.5 * 4)
    assert int(make_module(vg_prob=0.1).choose_gray(4, torch.device("cpu")).sum()) == 1
    assert make_module(vg_prob=0.0).choose_gray(4, torch.device("cpu")) is None

    use = torch.tensor([True, False, True, False])
    gray = module.gray_tokens(batch["image"], use)  # (B, Li)
    ref = module.image_tokens(rgb_to_grayscale(batch["image"], 3)).flatten(1)
    torch.testing.assert_close(gray[use], ref[use])
    assert (gray[~use] == 0).all()

    with torch.no_grad():
        guided = module._losses(batch, use, noise=False)
        plain = module._losses(batch, None, noise=False)
    assert guided["loss_vg"] > 0 and plain["loss_vg"] == 0
    # without guidance the AR loss is Eq. 9 with L_vg = 0 (denominator unchanged)
    ref_ar = (plain["loss_txt"] + 7 * plain["loss_img"]) / 9
    torch.testing.assert_close(plain["loss_ar"], ref_ar)
    torch.testing.assert_close(plain["loss"], plain["loss_ar"] + 5 * plain["loss_sem"])


# ---------------------------------------------------------------- training


def test_overfits_a_handful_of_shapes_under_a_trainer(batch: dict[str, Any], tmp_path) -> None:
    """30 Lightning steps on 4 ShapesWorld samples: the image loss falls well below its start
    (and below the entropy of the token histogram: it learns per-sample tokens, not the
    marginal). The frozen VQGAN and CLIP do not move."""
    sched = functools.partial(warmup_plateau_schedulers, warmup_steps=2, patience=100)
    optim = functools.partial(torch.optim.AdamW, lr=6e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model = make_module(optimizer=optim, scheduler=sched, sem_max_samples=2)
    frozen = copy.deepcopy(
        {k: v for k, v in model.state_dict().items() if not k.startswith("gpt.")}
    )
    rec = Record()
    _trainer(tmp_path, 30, callbacks=[rec]).fit(model, _loader(batch, 30))
    assert len(rec.values) == 30
    tokens = model.image_tokens(batch["image"]).flatten()
    p = torch.bincount(tokens, minlength=64).float() / tokens.numel()
    marginal_entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    end = sum(rec.values[-3:]) / 3
    assert end < 0.5 * rec.values[0], rec.values
    assert end < 0.8 * marginal_entropy, (end, marginal_entropy)
    assert rec.lrs[:3] == pytest.approx([6e-4, 6e-3 * 0.55, 6e-3])  # warm-up from 0.1 x lr
    for k, v in model.state_dict().items():
        if not k.startswith("gpt."):
            torch.testing.assert_close(v, frozen[k], msg=k)

    metrics = _trainer(tmp_path, 1).validate(model, _loader(batch, 1), verbose=False)[0]
    for key in ("val/loss", "val/loss_txt", "val/loss_img", "val/loss_sem",
                "val/loss_img_guided", "val/loss_vg_guided"):  # fmt: skip
        assert key in metrics and metrics[key] > 0, key
    assert metrics["val/loss_img"] < 0.5 * rec.values[0]


def _vqgan_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    vq = VQGANModule(**VQ)
    path = tmp_path / "vqgan.ckpt"
    torch.save({"hyper_parameters": dict(vq.hparams), "state_dict": vq.state_dict()}, path)
    return path


def test_checkpoint_leaves_out_reloadable_frozen_weights_and_resumes(
    batch: dict[str, Any], tmp_path: Path
) -> None:
    clip_path = tmp_path / "clip.pt"
    torch.manual_seed(2)
    torch.save(ClipModel(TINY_CLIP_NAME).model.state_dict(), clip_path)
    vq_spec = {"ckpt_path": str(_vqgan_checkpoint(tmp_path))}
    clip_spec = {"model_name": TINY_CLIP_NAME, "pretrained": str(clip_path)}
    sched = functools.partial(warmup_plateau_schedulers, warmup_steps=3, patience=100)
    model = make_module(vqgan=vq_spec, clip=clip_spec, scheduler=sched, sem_max_samples=1)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, _loader(batch, 2))
    ckpt_path = tmp_path / "trans.ckpt"
    trainer.save_checkpoint(ckpt_path)

    raw = torch.load(ckpt_path, weights_only=True)  # plain values only
    keys = list(raw["state_dict"])
    assert keys and all(k.startswith("gpt.") for k in keys)
    assert raw["semani_frozen_reloaded"] == ["vqgan.", "clip."]

    loaded = SemaniTransModule.load_from_checkpoint(ckpt_path, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)

    resumed = make_module(vqgan=vq_spec, clip=clip_spec, scheduler=sched, sem_max_samples=1)
    rec = Record()
    trainer2 = _trainer(tmp_path, 4, callbacks=[rec])
    trainer2.fit(resumed, _loader(batch, 4), ckpt_path=str(ckpt_path))
    assert trainer2.global_step == 4
    # the warm-up continues where it stopped: steps 2 and 3 of 3
    assert rec.lrs == pytest.approx([5e-4 * (0.1 + 0.9 * 2 / 3), 5e-4])


def test_random_frozen_parts_stay_in_the_checkpoint(batch: dict[str, Any], tmp_path) -> None:
    model = make_module(lambda_sem=0.0, clip=None)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(model, _loader(batch, 1))
    trainer.save_checkpoint(tmp_path / "t.ckpt")
    raw = torch.load(tmp_path / "t.ckpt", weights_only=True)
    assert any(k.startswith("vqgan.") for k in raw["state_dict"])
    loaded = SemaniTransModule.load_from_checkpoint(tmp_path / "t.ckpt", weights_only=True)
    torch.testing.assert_close(
        loaded.vqgan.quantize.embedding.weight, model.vqgan.quantize.embedding.weight
    )


class ConstantLoss(pl.LightningModule):
    """Flat training loss, the real optimiser + scheduler factories."""

    def __init__(self, **sched: Any) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.sched = sched

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("train/loss", 1.0, on_step=True, on_epoch=True)
        return (self.w * 0).sum() + 1.0

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1.0)
        return [opt], warmup_plateau_schedulers(opt, **self.sched)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_warms_up_then_halves_on_a_flat_loss(interval: str, tmp_path: Path) -> None:
    rec = Record()
    if interval == "step":
        model = ConstantLoss(warmup_steps=4, patience=2, interval="step")
        _trainer(tmp_path, 12, callbacks=[rec]).fit(model, DataLoader(range(12), batch_size=1))
        assert rec.lrs == pytest.approx(
            [0.1, 0.325, 0.55, 0.775, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
        )
    else:  # 2 steps per epoch; patience 1 epoch, counted once the warm-up (2 steps) is over
        model = ConstantLoss(warmup_steps=2, patience=1, interval="epoch")
        _trainer(tmp_path, 10, callbacks=[rec]).fit(model, DataLoader(range(2), batch_size=1))
        assert rec.lrs == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5])


# ---------------------------------------------------------------- images and configs


def test_log_images(module: SemaniTransModule, batch: dict[str, Any]) -> None:
    out = module.log_images(batch, max_images=2, filter_thres=0.5)
    assert set(out) == {"inputs", "reconstructions", "samples", "samples_guided"}
    for key, images in out.items():
        assert images.shape == (2, 3, 64, 64), key
        assert images.min() >= -1 and images.max() <= 1, key
    ref = module.vqgan.decode_tokens(module.image_tokens(batch["image"][:2])).clamp(-1, 1)
    torch.testing.assert_close(out["reconstructions"], ref)
    assert set(module.log_images(batch, max_images=1, sample=False)) == {
        "inputs",
        "reconstructions",
    }


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_tiny_config_matches_vqgan_tiny_and_trains(batch: dict[str, Any]) -> None:
    cfg = OmegaConf.load(CONFIG_DIR / "semani_trans_tiny.yaml")
    vq_tiny = OmegaConf.load(CONFIG_DIR / "vqgan_tiny.yaml")
    for key in ("n_embed", "embed_dim", "ddconfig"):
        assert cfg.vqgan.config[key] == vq_tiny[key], key
    f = 2 ** (len(vq_tiny.ddconfig.ch_mult) - 1)
    assert cfg.gpt.image_len == (64 // f) ** 2 and cfg.gpt.image_vocab_size == vq_tiny.n_embed
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg)
    assert isinstance(model, SemaniTransModule) and model.clip is not None
    assert callable(model.optimizer_factory) and callable(model.scheduler_factory)
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.gpt.image_head.weight.grad.abs().sum() > 0


def test_train_task_runs_the_tiny_model(shapes_root: Path, tmp_path: Path) -> None:
    """`python train.py model=semani_trans_tiny data.context_length=32 debug=fdr`."""
    from semani.tasks.train import train
    from tests.conftest import compose

    overrides = [
        "model=semani_trans_tiny", f"data.root={shapes_root}", "data.context_length=32",
        "data.num_workers=0", "data.batch_size=2", "model.sem_max_samples=1",
        "extras.print_config=false", "debug=fdr",
    ]  # fmt: skip
    metrics, objects = train(compose("train", overrides, tmp_path))
    assert isinstance(objects["model"], SemaniTransModule)
    for key in ("train/loss", "train/loss_img", "train/loss_sem", "val/loss_img"):
        assert torch.isfinite(torch.as_tensor(metrics[key])), key

    bad = compose("train", [*overrides[:2], "data.num_workers=0", "debug=fdr"], tmp_path / "b")
    with pytest.raises(ValueError, match="set data.context_length=32"):
        train(bad)


def test_paper_config_is_the_paper_size() -> None:
    paths = {"paths": {"pretrained_dir": "/pretrained"}}
    cfg = OmegaConf.merge(paths, OmegaConf.load(CONFIG_DIR / "semani_trans.yaml"))
    gpt = GPTConfig(**cfg.gpt)
    paper = GPTConfig(text_pad_targets=True)  # + the authors' per-position pad classes
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.text_len, gpt.image_len) == (
        24,
        8,
        512,
        128,
        256,
    )
    assert gpt == paper
    assert (cfg.lambda_txt, cfg.lambda_img, cfg.lambda_vg, cfg.lambda_sem) == (1.0, 7.0, 1.0, 5.0)
    assert (
        cfg.clip.model_name == "ViT-B-32" and cfg.clip.pretrained == "/pretrained/clip/ViT-B-32.pt"
    )
    assert cfg.vqgan.taming_ckpt == "/pretrained/vqgan_imagenet_f16_1024/ckpts/last.ckpt"
    assert cfg.vqgan.taming_config == "/pretrained/vqgan_imagenet_f16_1024/configs/model.yaml"
    assert cfg.optimizer.lr == 5e-4 and list(cfg.optimizer.betas) == [0.9, 0.96]
    assert cfg.scheduler.warmup_steps == 5000 and cfg.scheduler.factor == 0.5
