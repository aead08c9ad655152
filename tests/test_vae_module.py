"""The VAE stage (`VAEModule`, `experiment=vae_shapes`) and SeMani-Diff reading its VAE."""

from pathlib import Path

import pytest
import torch

import semani
from semani.models.semani_diff import SemaniDiffModule
from semani.models.vae_module import VAEModule, load_vae
from semani.tasks.train import train
from tests.conftest import compose

TINY = {"seed": 0, "channels": [8, 8, 8, 8], "layers_per_block": 1, "latent_size": 8}


def test_training_lowers_the_reconstruction_error() -> None:
    torch.manual_seed(0)
    module = VAEModule(tiny=TINY)
    images = torch.rand(4, 3, 1, 1).expand(4, 3, 32, 32).clone() * 2 - 1  # flat colours
    images[:, :, 8:20, 8:20] = -images[:, :, 8:20, 8:20]  # and a square
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(module.losses(images, sample=False)["rec_mse"])
    for _ in range(40):
        loss = module.losses(images, sample=True)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(module.losses(images, sample=False)["rec_mse"])
    assert after < 0.7 * before


def test_kl_is_the_per_element_gaussian_kl() -> None:
    module = VAEModule(tiny=TINY, kl_weight=0.5)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    out = module.losses(images, sample=True)
    dist = module.vae.encode(images).latent_dist
    m, s = dist.mean, dist.std
    expected = (0.5 * (m**2 + s**2 - 1 - 2 * s.log())).mean()
    torch.testing.assert_close(out["kl"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["rec"] + 0.5 * out["kl"])


def test_latent_std_is_the_std_of_posterior_samples() -> None:
    module = VAEModule(tiny=TINY)
    batches = [torch.rand(3, 3, 32, 32) * 2 - 1 for _ in range(3)]
    torch.manual_seed(5)
    std = module.latent_std(batches, max_batches=2)
    torch.manual_seed(5)
    with torch.no_grad():
        z = torch.cat([module.vae.encode(b).latent_dist.sample() for b in batches[:2]])
    assert std == pytest.approx(float(z.double().std(unbiased=False)), rel=1e-6)


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of tiny"):
        VAEModule()
    with pytest.raises(ValueError, match="rec_loss"):
        VAEModule(tiny=TINY, rec_loss="lpips")
    with pytest.raises(FileNotFoundError, match="experiment=vae_shapes"):
        load_vae(tmp_path)


@pytest.fixture(scope="module")
def vae_run(shapes_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae_run")
    overrides = [
        "experiment=vae_shapes",
        f"data.root={shapes_root}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "model.scale_batches=2",
        "test=false",
        "extras.print_config=false",
    ]
    train(compose("train", overrides, out))
    return out


def test_vae_shapes_exports_a_scaled_vae(vae_run: Path) -> None:
    vae = load_vae(vae_run / "vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.scaling_factor > 0
    module = semani.load_model(vae_run / "checkpoints" / "last.ckpt")
    assert isinstance(module, VAEModule)
    for (name, a), b in zip(module.vae.state_dict().items(), vae.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert sorted(p.name for p in vae_run.iterdir() if "vae" in p.name) == ["vae"]


def test_semani_diff_reads_the_vae_stage(vae_run: Path, tok_dir: Path) -> None:
    # the stage's VAE (configs/experiment/vae_shapes.yaml): 3 levels, factor 4
    tiny = {"seed": 0, "cross_attention_dim": 32, "tokenizer_folder": str(tok_dir),
            "vae_channels": [16, 32, 32], "sample_size": 8}  # fmt: skip
    vae = load_vae(vae_run / "vae")
    assert list(vae.config.block_out_channels) == [16, 32, 32]
    module = SemaniDiffModule(tiny=tiny, vae=str(vae_run / "vae"), cache_latents=True)
    assert module.vae.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    for (name, a), b in zip(module.vae.state_dict().items(), vae.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in module.vae.parameters())
    # a 4-level model VAE (factor 8, the tiny model's default) does not fit it
    with pytest.raises(ValueError, match="block_out_channels"):
        SemaniDiffModule(tiny={**tiny, "vae_channels": [16, 16, 32, 32]}, vae=str(vae_run / "vae"))
