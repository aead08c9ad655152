"""SeMani-Diff training (SemaniDiffModule) on tiny random components and a tiny ShapesWorld."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import semani
from semani.data.base import collate_samples
from semani.data.shapes import ShapesWorldDataset
from semani.models.semani_diff import SemaniDiffModule
from semani.tasks.train import train
from semani.utils.checkpoint import load_checkpoint
from tests.conftest import compose


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def make(tok_dir: Path):
    """SemaniDiffModule on the default tiny components (VAE factor 8: 32 px -> 4x4 latents)."""

    def make(**kwargs) -> SemaniDiffModule:
        kwargs.setdefault("tiny", {"seed": 0, "tokenizer_folder": str(tok_dir)})
        return SemaniDiffModule(**kwargs)

    return make


def shapes_batch(root: Path, n: int) -> dict:
    ds = ShapesWorldDataset(root=root, split="train", image_size=32)
    return collate_samples([ds[i] for i in range(n)])


@pytest.fixture(scope="module")
def batch(shapes_root: Path) -> dict:
    return shapes_batch(shapes_root, 4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_is_mse_against_the_scheduler_target(make, batch: dict, kind: str) -> None:
    model = make(prediction_type=kind, text_dropout=0.3, mask_dropout=0.3)
    with torch.no_grad():
        loss = model.compute_loss(batch, gen(7))["loss"]
        inp = model.training_inputs(batch, gen(7))
        again = model.compute_loss(batch, gen(7))["loss"]
        other = model.compute_loss(batch, gen(8))["loss"]
        # recomputed here: SD's scaled-linear betas, q(z_t | z_0), the target, the 9 channels
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)[inp["timesteps"]].float()[:, None, None, None]
        z0, eps = inp["latents"], inp["noise"]
        noisy = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        target = eps if kind == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * z0
        mask = F.interpolate(inp["mask"], size=(4, 4), mode="nearest")
        ids = model.tokenizer(
            inp["captions"], padding="max_length", max_length=77, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        embeds = model.text_encoder(ids)[0]
        x = torch.cat([noisy, mask, inp["masked_latents"]], 1)
        pred = model.unet(x, inp["timesteps"], encoder_hidden_states=embeds).sample
        expected = F.mse_loss(pred, target)
        # the inputs: posterior sample of the VAE, masked image as diffusers
        mean = model.vae.encode(batch["image"]).latent_dist.mean
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert loss == again and loss != other
    assert torch.equal(inp["masked_image"], batch["image"] * (inp["mask"] < 0.5))
    torch.testing.assert_close(inp["posterior"][0], mean)
    torch.testing.assert_close(
        inp["latents"], inp["posterior"][2] * model.vae.config.scaling_factor
    )
    assert inp["latents"].shape == (4, 4, 4, 4) and inp["timesteps"].dtype == torch.long


def test_unknown_prediction_type_is_refused(make) -> None:
    with pytest.raises(ValueError, match="'sample'"):
        make(prediction_type="sample")


def test_condition_dropout_follows_the_generator(make, shapes_root: Path) -> None:
    model = make(text_dropout=0.5, mask_dropout=0.5)
    batch = shapes_batch(shapes_root, 8)
    g = gen(11)  # the first two draws of the step: text dropout, then mask dropout
    want_text, want_mask = torch.rand(8, generator=g) < 0.5, torch.rand(8, generator=g) < 0.5
    assert 0 < want_text.sum() < 8 and 0 < want_mask.sum() < 8
    with torch.no_grad():
        inp = model.training_inputs(batch, gen(11))
        kept = model.training_inputs(batch, gen(11), dropout=False)
    assert torch.equal(inp["drop_text"], want_text) and torch.equal(inp["drop_mask"], want_mask)
    for i in range(8):
        assert inp["captions"][i] == ("" if want_text[i] else batch["caption"][i])
        if want_mask[i]:  # empty mask condition: re-paint everything, the masked image is 0
            assert (inp["mask"][i] == 1).all() and (inp["mask_latent"][i] == 1).all()
            assert (inp["masked_image"][i] == 0).all()
        else:
            assert inp["mask"][i].mean() < 1
    assert kept["captions"] == batch["caption"] and not kept["drop_mask"].any()
    assert (kept["mask"].flatten(1).mean(1) < 1).all()


def test_save_pretrained_opens_in_diffusers_and_diff_editor(make, batch: dict, tmp_path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from semani.manipulation.diff_editor import DiffEditor

    model = make(use_ema=True)
    live = [p.detach().clone() for p in model.unet.parameters()]
    for s in model.ema.shadow_params:  # EMA weights that differ from the live ones
        s.add_(0.01)
    folder = model.save_pretrained(tmp_path / "export")
    assert all(torch.equal(p, q) for p, q in zip(model.unet.parameters(), live))  # restored
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder, safety_checker=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    torch.testing.assert_close(next(pipe.unet.parameters()), model.ema.shadow_params[0])
    image = ((batch["image"][0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe(
        "a red circle", image=Image.fromarray(image), mask_image=Image.fromarray(mask),
        height=32, width=32, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()

    editor = DiffEditor.from_pretrained(folder, steps=2)
    edited = editor.edit(image, mask > 0, "a red circle", seed=0)
    assert edited.shape == (1, 32, 32, 3) and edited.dtype == np.uint8

    reread = SemaniDiffModule(source=str(folder))  # the export is a valid source
    torch.testing.assert_close(next(reread.unet.parameters()), model.ema.shadow_params[0])
    model.save_pretrained(folder)  # overwriting an export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_validation_runs_on_ema_weights_and_checkpoints_keep_training_weights(make) -> None:
    model = make(use_ema=True)
    live = [p.detach().clone() for p in model.unet.parameters()]
    for s in model.ema.shadow_params:
        s.add_(0.01)
    model.on_validation_epoch_start()
    assert torch.equal(next(model.unet.parameters()), model.ema.shadow_params[0])
    ckpt = {"state_dict": model.state_dict()}  # a checkpoint written while swapped
    model.on_save_checkpoint(ckpt)
    model.on_validation_epoch_end()
    assert all(torch.equal(p, q) for p, q in zip(model.unet.parameters(), live))
    names = [f"unet.{n}" for n, _ in model.unet.named_parameters()]
    assert all(torch.equal(ckpt["state_dict"][n], q) for n, q in zip(names, live))
    assert ckpt["semani_model"] == "semani.models.semani_diff.SemaniDiffModule"
    assert torch.equal(ckpt["semani_ema"]["shadow_params"][0], model.ema.shadow_params[0])


def test_log_images_restores_the_training_state(make, batch: dict) -> None:
    model = make(val_sample_steps=2, use_ema=True).train()
    images = model.log_images(batch, max_images=2)
    assert set(images) == {"inputs", "masked", "samples"}
    assert images["samples"].shape == (2, 3, 32, 32) and images["samples"].abs().max() <= 1
    assert model.training and model.unet.training and not model.vae.training
    assert all(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())


def test_eval_losses_are_fixed(make, batch: dict) -> None:
    model = make(val_timesteps=[10, 500])
    with torch.no_grad():
        a, b = model.eval_losses(batch, 0), model.eval_losses(batch, 0)
    assert list(a) == [10, 500] and all(a[t] == b[t] for t in a)


def test_only_the_unet_trains_by_default(make) -> None:
    model = make(lr_schedule="constant", gradient_checkpointing=True).train()
    assert model.unet.is_gradient_checkpointing
    assert not model.vae.training and not model.text_encoder.training
    opt = model.configure_optimizers()["optimizer"]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.unet.parameters()}


def test_cached_latents_encode_each_image_once(make, batch: dict) -> None:
    model = make(cache_latents=True)
    sizes: list[int] = []
    encode = model.vae.encode
    model.vae.encode = lambda x, *a, **k: sizes.append(x.shape[0]) or encode(x, *a, **k)
    with torch.no_grad():
        first = model.training_inputs(batch, gen(0), use_cache=True)
        second = model.training_inputs(batch, gen(0), use_cache=True)
    assert sizes == [4, 4, 4]  # images + masked images, then the masked images only
    torch.testing.assert_close(first["latents"], second["latents"])
    with pytest.raises(ValueError, match="index"):
        model.training_inputs({k: v for k, v in batch.items() if k != "index"}, gen(0), True)
    with pytest.raises(ValueError, match="frozen VAE"):
        make(cache_latents=True, train_vae=True)


def test_source_or_tiny_exactly_one(make, tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        make(tiny=None)
    with pytest.raises(ValueError, match="exactly one"):
        make(source=str(tmp_path))


def test_8bit_adam_without_bitsandbytes_says_how_to_install(make, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        make(use_8bit_adam=True)


# ------------------------------------------------------------------ train.py on ShapesWorld


def shapes_overrides(shapes_root: Path, tok_dir: Path) -> list[str]:
    return [
        "experiment=semani_diff_shapes",
        f"data.root={shapes_root}",
        "data.batch_size=2",
        "data.num_workers=0",
        f"model.tiny.tokenizer_folder={tok_dir}",
        "extras.print_config=false",
    ]


def test_semani_diff_shapes_fast_dev_run(shapes_root: Path, tok_dir: Path, tmp_path) -> None:
    overrides = [*shapes_overrides(shapes_root, tok_dir), "model.val_sample_steps=2", "debug=fdr"]
    metrics, objects = train(compose("train", overrides, tmp_path))
    assert isinstance(objects["model"], SemaniDiffModule)
    for key in ("train/loss", "train/vae_rec", "val/loss"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def fit(shapes_root: Path, tok_dir: Path, out: Path, max_steps: int, ckpt: Path | None = None):
    overrides = [
        *shapes_overrides(shapes_root, tok_dir),
        f"trainer.max_steps={max_steps}",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.image_logger=null",
        "model.val_sample_steps=0",
    ]
    if ckpt is not None:
        overrides.append(f"ckpt_path={ckpt}")
    return train(compose("train", overrides, out))


@pytest.fixture(scope="module")
def two_step_run(shapes_root: Path, tok_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("semani_diff_run")
    fit(shapes_root, tok_dir, out, max_steps=2)
    return out


def test_resume_continues_the_step_counter(
    two_step_run: Path, shapes_root: Path, tok_dir: Path, tmp_path
) -> None:
    last = two_step_run / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)
    assert saved["global_step"] == 2 and saved["semani_ema"]["optimization_step"] == 2
    assert (two_step_run / "diffusers" / "model_index.json").is_file()  # exported at the end
    _, objects = fit(shapes_root, tok_dir, tmp_path, max_steps=4, ckpt=last)
    assert objects["trainer"].global_step == 4
    assert objects["model"].ema.optimization_step == 4
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_load_model_opens_the_checkpoint_in_eval_mode(two_step_run: Path) -> None:
    last = two_step_run / "checkpoints" / "last.ckpt"
    model = semani.load_model(last)
    assert isinstance(model, SemaniDiffModule) and not model.training
    state = load_checkpoint(last)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.ema.optimization_step == 2


def test_entity_masks_stay_on_the_cpu_when_the_batch_moves(make, batch: dict) -> None:
    module = make()
    moved = module.transfer_batch_to_device(dict(batch), torch.device("meta"), 0)
    assert moved["image"].device.type == "meta"  # everything else moves
    assert all(m.device.type == "cpu" for m in moved["entity_masks"])
    assert moved["entity_masks"] is batch["entity_masks"]


def test_caption_ids_are_the_tokenizers_and_tokenize_each_caption_once(make) -> None:
    from semani.modules.diffusion_parts import tokenize_text

    module = make()
    calls: list[int] = []
    tokenizer = module.tokenizer
    module.tokenizer = lambda texts, **kw: calls.append(len(texts)) or tokenizer(texts, **kw)
    module.tokenizer.model_max_length = tokenizer.model_max_length
    captions = ["a red circle", "", "a blue square", "a red circle"]
    first = module.caption_ids(captions)
    again = module.caption_ids(captions[::-1])
    assert calls == [3]  # three distinct captions, tokenized once
    torch.testing.assert_close(first, tokenize_text(tokenizer, captions))
    torch.testing.assert_close(again, first.flip(0))


def test_masks_drawn_by_the_data_module_replace_the_models(make, shapes_root: Path) -> None:
    from semani.data.datamodule import SemaniDataModule

    dm = SemaniDataModule(
        dataset="shapes",
        root=str(shapes_root),
        image_size=32,
        batch_size=4,
        num_workers=0,
        inpaint_masks={"entity": 0.0, "box": 1.0, "stroke": 0.0},
    )
    dm.setup("fit")  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["inpaint_mask"].shape == (4, 1, 32, 32) and batch["mask_kind"] == ["box"] * 4
    assert "inpaint_mask" not in next(iter(dm.val_dataloader()))  # evaluation stays fixed
    model = make(mask_dropout=0.5)
    model.mask_sampler.sample = lambda *a, **k: pytest.fail("the model drew its own masks")
    with torch.no_grad():
        inp = model.training_inputs(batch, gen(3))
    for i in range(4):
        want = torch.ones(1, 32, 32) if inp["drop_mask"][i] else batch["inpaint_mask"][i]
        assert torch.equal(inp["mask"][i], want)
    assert inp["mask_kinds"] == ["box"] * 4
    with pytest.raises(ValueError, match="webdataset"):
        SemaniDataModule(
            dataset="webdataset", root="x", shards="x.tar", inpaint_masks={"box": 1.0}
        )
    with pytest.raises(TypeError):
        SemaniDataModule(dataset="shapes", root="x", inpaint_masks={"boxes": 1.0})
    with pytest.raises(ValueError, match="needs data.inpaint_masks"):
        SemaniDataModule(dataset="shapes", root="x", entity_captions=0.5)
    with pytest.raises(ValueError, match="entity_captions must be"):
        SemaniDataModule(dataset="shapes", root="x", inpaint_masks={}, entity_captions=2.0)
