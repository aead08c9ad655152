"""VQGANModule: taming-checkpoint equivalence, token API, LPIPS gating, GAN training, resume."""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.discriminator.model import NLayerDiscriminator
from taming.modules.vqvae.quantize import VectorQuantizer2
from torch import nn
from torch.utils.data import DataLoader

from semani.models.vqgan import VQGANModule
from semani.modules.vqgan_loss import VQGANLoss
from semani.utils.checkpoint import CheckpointMismatchError, load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F16_DDCONFIG = dict(
    double_z=False,
    z_channels=256,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 1, 2, 2, 4],
    num_res_blocks=2,
    attn_resolutions=[16],
    dropout=0.0,
)
TINY_DDCONFIG = dict(F16_DDCONFIG, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1)


def taming_yaml(path: Path, ddconfig: dict, n_embed: int, embed_dim: int) -> Path:
    """A config in the layout of taming's configs/imagenet_vqgan.yaml."""
    cfg = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": embed_dim,
                "n_embed": n_embed,
                "ddconfig": ddconfig,
                "lossconfig": {
                    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {
                        "disc_conditional": False,
                        "disc_in_channels": 3,
                        "disc_start": 250001,
                        "disc_weight": 0.8,
                        "codebook_weight": 1.0,
                    },
                },
            },
        }
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class TamingVQ(nn.Module):
    """taming's VQModel minus Lightning: its modules, attribute names and decode path."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    """A random taming VQGAN with the official f16-1024 settings, saved like the released files."""
    torch.manual_seed(0)
    ref = TamingVQ(F16_DDCONFIG, n_embed=1024, embed_dim=256).eval()
    disc = NLayerDiscriminator(input_nc=3, n_layers=3)
    sd = dict(ref.state_dict())
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    out = tmp_path_factory.mktemp("taming")
    ckpt = {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
        "state_dict": sd,
    }
    torch.save(ckpt, out / "last.ckpt")
    config = taming_yaml(out / "model.yaml", F16_DDCONFIG, n_embed=1024, embed_dim=256)
    return ref, out / "last.ckpt", config, len(sd) - len(ref.state_dict())


def test_from_taming_loads_strictly_and_matches_taming(official, caplog) -> None:
    ref, ckpt, config, n_loss_keys = official
    with caplog.at_level(logging.INFO, logger="semani.models.vqgan"):
        model = VQGANModule.from_taming(ckpt, config).eval()
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert (
        f"dropped {n_loss_keys} loss.* keys (loss.discriminator, loss.perceptual_loss)"
        in dropped[0]
    )
    assert model.loss is None and model.n_embed == 1024 and model.embed_dim == 256
    assert model.downsample_factor == 16 and model.learning_rate == 4.5e-6
    assert list(model.state_dict()) == list(ref.state_dict())

    x = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        quant, _, (_, _, idx) = ref.quantize(ref.quant_conv(ref.encoder(x)))
        ref_tokens = idx.reshape(2, 2, 1)  # (32, 16) px / f16 -> 2x1 tokens
        ref_rec = ref.decode(quant)
        ref_dec = ref.decode(ref.quantize.get_codebook_entry(idx.reshape(-1), (2, 2, 1, 256)))
        tokens = model.encode_to_tokens(x)
        assert tokens.dtype == torch.long and torch.equal(tokens, ref_tokens)
        assert torch.equal(model.decode_tokens(tokens), ref_dec)
        assert torch.equal(model(x)[0], ref_rec)


def test_from_taming_with_loss_needs_lpips_weights(official, tmp_path: Path, monkeypatch) -> None:
    _, ckpt, config, _ = official
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)  # taming's default vgg.pth location is cwd-relative
    with pytest.raises(FileNotFoundError) as err:
        VQGANModule.from_taming(ckpt, config, with_loss=True)
    msg = str(err.value)
    assert str(tmp_path / "taming/modules/autoencoder/lpips/vgg.pth") in msg
    assert str(tmp_path / "torch/hub/checkpoints/vgg16-397923af.pth") in msg


def test_lpips_error_names_both_files_and_the_way_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(FileNotFoundError) as err:
        VQGANLoss(disc_start=0, perceptual_weight=1.0, lpips_ckpt=str(tmp_path / "w/vgg.pth"))
    msg = str(err.value)
    assert f"'{tmp_path / 'w/vgg.pth'}'" in msg and "d507d7349b931f0638a25a48a722f98a" in msg
    assert f"'{tmp_path / 'th/hub/checkpoints/vgg16-397923af.pth'}'" in msg
    assert "model.loss.lpips_ckpt" in msg and "perceptual_weight=0" in msg
    loss = VQGANLoss(disc_start=0, perceptual_weight=0.0)  # no LPIPS asked: no files needed
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss") for k in loss.state_dict())


def test_lpips_is_built_from_local_files_with_taming_key_names(
    tmp_path: Path, monkeypatch
) -> None:
    import taming.modules.losses.lpips as taming_lpips
    from torchvision.models.vgg import cfgs as vgg_cfgs
    from torchvision.models.vgg import make_layers

    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg16-397923af.pth").touch()  # torchvision's loader is replaced below
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    # taming's vgg16 uses only `.features`: a random VGG-16 trunk, no download
    trunk = SimpleNamespace(features=make_layers(vgg_cfgs["D"]))
    monkeypatch.setattr(taming_lpips.models, "vgg16", lambda pretrained=False, **kw: trunk)
    chns = [64, 128, 256, 512, 512]
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chns)}
    torch.save(lin, tmp_path / "vgg.pth")
    loss = VQGANLoss(disc_start=0, perceptual_weight=1.0, lpips_ckpt=str(tmp_path / "vgg.pth"))
    sd = loss.state_dict()
    assert torch.equal(sd["perceptual_loss.lin3.model.1.weight"], lin["lin3.model.1.weight"])
    assert "perceptual_loss.net.slice1.0.weight" in sd and "discriminator.main.0.weight" in sd
    assert not any(p.requires_grad for p in loss.perceptual_loss.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    loss.eval()
    rec_same, p_same = loss.reconstruction_loss(x, x)
    rec, p = loss.reconstruction_loss(x, -x)
    assert p_same.abs().max() < 1e-6 and rec_same.abs().max() < 1e-6 and p.item() > 0

    torch.save({"net.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an LPIPS-VGG linear-layer file"):
        VQGANLoss(disc_start=0, perceptual_weight=1.0, lpips_ckpt=str(tmp_path / "bad.pth"))


def test_wrong_checkpoints_fail_with_named_keys(tmp_path: Path) -> None:
    config = taming_yaml(tmp_path / "tiny.yaml", TINY_DDCONFIG, n_embed=16, embed_dim=4)
    trans = {"gpt.wte.weight": torch.zeros(4, 4), "vqgan.encoder.conv_in.weight": torch.zeros(1)}
    torch.save({"state_dict": trans, "hyper_parameters": {"gpt": {}}}, tmp_path / "trans.ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        VQGANModule.from_taming(tmp_path / "trans.ckpt", config)
    msg = str(err.value)
    assert "missing keys: encoder.conv_in.weight" in msg and "a taming VQModel state_dict" in msg
    assert "unexpected keys (prefixes gpt., vqgan.)" in msg
    with pytest.raises(KeyError, match=r"lack \['ddconfig', 'embed_dim', 'n_embed'\].*\['gpt'\]"):
        VQGANModule.from_checkpoint(tmp_path / "trans.ckpt")

    torch.save({"weights": {}}, tmp_path / "nosd.ckpt")
    with pytest.raises(KeyError, match=r"no 'state_dict'.*weights"):
        VQGANModule.from_taming(tmp_path / "nosd.ckpt", config)
    with pytest.raises(KeyError, match="from_taming"):  # a taming file given to from_checkpoint
        VQGANModule.from_checkpoint(tmp_path / "nosd.ckpt")
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        VQGANModule.from_taming(tmp_path / "nosd.ckpt", tmp_path / "absent.yaml")
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        VQGANModule.from_taming(tmp_path / "absent.ckpt", config)

    other = TamingVQ(dict(TINY_DDCONFIG, ch=64), n_embed=16, embed_dim=4)  # config mismatch
    torch.save({"state_dict": other.state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches.*does the model config"):
        VQGANModule.from_taming(tmp_path / "wide.ckpt", config)


def tiny_model(disc_start: int = 2, seed: int = 0) -> VQGANModule:
    """The configs/model/vqgan_tiny.yaml model, instantiated as Hydra does."""
    torch.manual_seed(seed)
    cfg = OmegaConf.load(CONFIGS / "model" / "vqgan_tiny.yaml")
    cfg.loss.disc_start = disc_start
    return hydra.utils.instantiate(cfg)


def test_tiny_config_tokens_round_trip() -> None:
    model = tiny_model().eval()
    assert isinstance(model.hparams["ddconfig"], dict) and isinstance(model.hparams["loss"], dict)
    assert model.n_embed == 256 and model.embed_dim == 32 and model.downsample_factor == 8
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = model.encode_to_tokens(x)
    assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 256
    with torch.no_grad():
        images = model.decode_tokens(tokens)
        assert images.shape == (2, 3, 64, 64)
        torch.testing.assert_close(images, model(x)[0], atol=1e-4, rtol=1e-4)
        # a codebook vector quantizes back to its own index
        codes = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:32].reshape(
            2, 4, 4
        )
        z = model.quantize.get_codebook_entry(codes.reshape(-1), (2, 4, 4, 32))
        assert torch.equal(model.quantize(z)[2][2], codes)
    log = model.log_images({"image": x, "caption": ["a", "b"]}, max_images=1)
    assert set(log) == {"inputs", "reconstructions"} and log["reconstructions"].shape == (
        1,
        3,
        64,
        64,
    )
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode_tokens(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match=r"integer tokens \(B, h, w\)"):
        model.decode_tokens(tokens.flatten(1))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_to_tokens(x[:, :1])


def test_embed_onehot_equals_codebook_lookup_and_passes_gradients() -> None:
    model = tiny_model().eval().requires_grad_(False)  # frozen, as SeMani-Trans uses it
    tokens = torch.randint(0, 256, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    onehot = F.one_hot(tokens, 256).float().requires_grad_(True)  # (B, h, w, K)
    z_q = model.embed_onehot(onehot)
    assert z_q.shape == (2, 32, 4, 4)
    assert torch.equal(z_q, model.quantize.get_codebook_entry(tokens.reshape(-1), (2, 4, 4, 32)))
    images = model.decode(z_q)
    assert torch.equal(images.detach(), model.decode_tokens(tokens))
    images.square().mean().backward()
    assert onehot.grad is not None and onehot.grad.abs().sum() > 0
    # straight-through (Gumbel hard) as SeMani-Trans uses it: gradients reach the logits
    logits = torch.randn(2, 4, 4, 256, requires_grad=True)
    model.decode(
        model.embed_onehot(F.gumbel_softmax(logits, tau=1.0, hard=True))
    ).mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, h, w, 256\)"):
        model.embed_onehot(onehot[..., :10])


def _loader(n: int = 8, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [
        {"image": torch.rand(3, size, size, generator=g) * 2 - 1, "caption": "x"} for _ in range(n)
    ]
    return DataLoader(data, batch_size=2)


def _trainer(tmp_path: Path, max_steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


class _Snapshots(pl.Callback):
    """Copies of the generator and discriminator weights after every training batch."""

    def __init__(self) -> None:
        self.gen, self.disc, self.steps = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.gen.append(pl_module.decoder.conv_out.weight.detach().clone())
        self.disc.append(pl_module.loss.discriminator.main[0].weight.detach().clone())
        self.steps.append(trainer.global_step)


def test_manual_optimisation_trains_generator_then_discriminator(tmp_path: Path) -> None:
    model = tiny_model(disc_start=2)
    gen0 = model.decoder.conv_out.weight.detach().clone()
    disc0 = model.loss.discriminator.main[0].weight.detach().clone()
    snaps = _Snapshots()
    cb_cfg = OmegaConf.load(CONFIGS / "callbacks" / "image_logger.yaml").image_logger
    cb_cfg.every_n_steps = 4
    callbacks = [snaps, hydra.utils.instantiate(cb_cfg)]
    trainer = _trainer(tmp_path, max_steps=8, callbacks=callbacks, enable_checkpointing=False)
    trainer.fit(model, _loader())
    assert snaps.steps == [2, 4, 6, 8]  # global_step counts both optimisers: 2 per batch
    pngs = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    expected = [
        f"{k}_gs-{s:06}_e-000.png" for k in ("inputs", "reconstructions") for s in (2, 4, 8)
    ]
    assert pngs == expected  # ImageLogger from its config: new multiples of 4 at steps 2, 4, 8
    assert not torch.equal(snaps.gen[0], gen0)  # the autoencoder learns from the first batch
    assert torch.equal(snaps.disc[1], disc0)  # batches 0, 1 < disc_start=2: D untouched
    assert not torch.equal(snaps.disc[3], disc0)  # after disc_start it trains
    metrics = trainer.callback_metrics
    assert metrics["train/disc_factor_step"] == 1.0 and metrics["train/d_weight_step"] > 0
    assert metrics["train/disc_loss_step"] > 0 and torch.isfinite(metrics["train/aeloss_step"])


def test_checkpoint_is_weights_only_safe_and_resumes(tmp_path: Path) -> None:
    model = tiny_model(disc_start=1)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, max_steps=4, callbacks=[ckpt_cb], limit_val_batches=1).fit(
        model, _loader(), _loader(2)
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = load_checkpoint(last)  # weights_only=True: no pickled objects in our checkpoints
    assert saved["global_step"] == 4 and len(saved["optimizer_states"]) == 2
    assert saved["hyper_parameters"]["loss"]["disc_start"] == 1

    restored = VQGANModule.from_checkpoint(last).eval()  # inference: loss.* dropped
    assert restored.loss is None
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(restored(x)[0], model.eval()(x)[0])
    assert VQGANModule.from_checkpoint(last, with_loss=True).loss is not None

    seen = {}

    class _AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            opt_ae = trainer.optimizers[0]
            seen["step"] = trainer.global_step
            seen["adam"] = float(next(iter(opt_ae.state.values()))["step"])

    resumed = tiny_model(disc_start=1, seed=1)
    trainer = _trainer(tmp_path, max_steps=8, callbacks=[_AtStart()], enable_checkpointing=False)
    trainer.fit(resumed, _loader(), ckpt_path=last)
    assert seen == {"step": 4, "adam": 2.0}  # 2 batches done, both optimisers restored
    assert trainer.global_step == 8


def test_training_without_loss_is_a_clear_error() -> None:
    model = VQGANModule(ddconfig=TINY_DDCONFIG, n_embed=16, embed_dim=4)  # inference only
    with pytest.raises(RuntimeError, match="without a loss"):
        model.configure_optimizers()
    with pytest.raises(RuntimeError, match="without a loss"):
        model.training_step({"image": torch.zeros(1, 3, 16, 16)}, 0)
    with pytest.raises(ValueError, match="double_z=false"):
        VQGANModule(ddconfig=dict(TINY_DDCONFIG, double_z=True), n_embed=16, embed_dim=4)


def test_f16_config_is_the_paper_vqgan_and_asks_for_lpips(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cfg = OmegaConf.create({"paths": {"pretrained_dir": str(tmp_path / "pre")}})
    cfg.model = OmegaConf.load(CONFIGS / "model" / "vqgan_f16_1024.yaml")
    assert cfg.model.ddconfig == F16_DDCONFIG and cfg.model.loss.disc_start == 250001
    with pytest.raises(
        InstantiationException, match=re.escape(str(tmp_path / "pre/lpips/vgg.pth"))
    ):
        hydra.utils.instantiate(cfg.model)  # Hydra wraps the loss's FileNotFoundError
    cfg.model.loss.perceptual_weight = 0.0
    model = hydra.utils.instantiate(cfg.model)
    ref_keys = TamingVQ(F16_DDCONFIG, 1024, 256).state_dict().keys()
    assert {k for k in model.state_dict() if not k.startswith("loss.")} == set(ref_keys)
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("loss.")} == {
        "discriminator"
    }


def test_dead_codes_are_restarted_to_encoder_outputs() -> None:
    """Codes no token used within `restart_dead_codes` batches become encoder outputs."""
    model = tiny_model()
    model.restart_dead_codes = 2
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))  # (2, e, 8, 8)
        tokens = model.quantize(h)[2][2]
    before = model.quantize.embedding.weight.detach().clone()
    used = torch.zeros(model.n_embed, dtype=torch.bool)
    used[tokens.flatten()] = True
    assert (~used).sum() > 0

    model._restart_dead_codes(h, tokens, step=0)  # first batch of the window: only counts
    torch.testing.assert_close(model.quantize.embedding.weight, before)
    model._restart_dead_codes(h, tokens, step=1)  # end of the window: restart
    after = model.quantize.embedding.weight.detach()
    torch.testing.assert_close(after[used], before[used])  # used codes untouched
    z = h.permute(0, 2, 3, 1).reshape(-1, model.embed_dim)
    for row in after[~used]:  # every restarted code is one of the encoder outputs
        assert torch.isclose(z, row).all(1).any()
    assert model.code_usage.sum() == 0  # the window starts afresh
    assert "code_usage" not in model.state_dict()  # official checkpoints still load strictly


def test_conv_arch_config_round_trips_learns_and_reloads(tmp_path: Path) -> None:
    """`model=vqgan_conv_tiny`: f4 at 32 px -> 8x8 tokens, trains, and reloads with its arch."""
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONFIGS / "model" / "vqgan_conv_tiny.yaml")
    model = hydra.utils.instantiate(cfg)
    assert model.hparams["arch"] == "conv" and model.downsample_factor == 4
    assert type(model.encoder).__name__ == "ConvEncoder"
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 1, 1, generator=g) * 2 - 1).expand(-1, -1, 32, 32).clone()  # backgrounds
    x[:, :, 8:20, 8:20] = torch.tensor([0.9, -0.8, 0.1]).view(1, 3, 1, 1)  # a coloured square
    with torch.no_grad():
        tokens = model.encode_to_tokens(x)
        assert tokens.shape == (4, 8, 8)
        assert model.decode_tokens(tokens).shape == (4, 3, 32, 32)
        start = (model(x)[0] - x).abs().mean()
    trainer = _trainer(tmp_path, max_steps=200, enable_checkpointing=True)
    trainer.fit(model, DataLoader([{"image": xi} for xi in x], batch_size=4))
    model.eval()
    with torch.no_grad():
        end = (model(x)[0] - x).abs().mean()
    assert end < 0.75 * start  # 100 batches of the same 4 images: the error falls
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    loaded = VQGANModule.from_checkpoint(ckpt)
    assert loaded.hparams["arch"] == "conv" and loaded.hparams["betas"] == [0.9, 0.999]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])
    kwargs = OmegaConf.to_container(cfg)
    kwargs.pop("_target_")
    with pytest.raises(ValueError, match="unknown VQGAN arch 'unet'"):
        VQGANModule(**{**kwargs, "arch": "unet"})
