"""SeMani-Diff editors on tiny random components: DiffEditor against diffusers' inpainting
pipeline, the pixel-space composite, and the Blended Latent Diffusion baseline."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semani.manipulation.blended import BlendedLatentEditor
from semani.manipulation.diff_editor import DiffEditor
from semani.manipulation.pixels import feather_weights, model_size
from semani.modules.diffusion_parts import tiny_inpaint_components

TEXT = "a red circle"


@pytest.fixture(scope="module")
def pipe(inpaint_folder: Path):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        inpaint_folder, safety_checker=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def editor(inpaint_folder: Path) -> DiffEditor:
    return DiffEditor.from_pretrained(inpaint_folder, steps=3, feather=3)


def image_and_mask(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random (h, w, 3) uint8 image and a bool rectangle mask inside it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 5 : 4 * h // 5, w // 4 : 3 * w // 4] = True
    return image, mask


@pytest.mark.parametrize(
    "guidance, num_images, scheduler",
    [(1.0, 1, "DDIMScheduler"), (7.5, 2, "DDIMScheduler"), (5.0, 1, "EulerDiscreteScheduler")],
)
def test_generate_matches_diffusers_pipeline(
    pipe, inpaint_folder: Path, guidance: float, num_images: int, scheduler: str
) -> None:
    import diffusers

    editor = DiffEditor.from_pretrained(
        inpaint_folder, scheduler=scheduler, guidance_form="diffusers"
    )
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    image, mask = image_and_mask(48, 80)  # non-square, on the VAE grid
    ref = pipe(
        TEXT,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
        height=48,
        width=80,
        num_inference_steps=4,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images  # (N, 48, 80, 3) in [0, 1]
    ours = editor.generate(
        image, mask, TEXT, seed=3, steps=4, guidance_scale=guidance, num_images=num_images
    )
    assert ours.shape == (num_images, 3, 48, 80)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-4, rtol=0)


def test_the_papers_guidance_feeds_the_empty_mask_condition(inpaint_folder: Path) -> None:
    """Eq. 15: the unconditional half of the guided batch has the empty text, the all-ones
    mask and the latent of the all-gray image; the conditional half the real ones. With
    guidance_form="diffusers" both halves carry the real mask."""
    from semani.manipulation.pixels import prepare_inputs

    image, mask = image_and_mask(16, 24)
    seen = {}
    for form in ("paper", "diffusers"):
        editor = DiffEditor.from_pretrained(inpaint_folder, guidance_form=form)
        inputs: list[torch.Tensor] = []
        hook = editor.unet.register_forward_hook(
            lambda m, args, out, seen=inputs: seen.append(args[0])
        )
        try:
            editor.generate(image, mask, TEXT, seed=0, steps=2, guidance_scale=3.0)
        finally:
            hook.remove()
        c = editor.vae.config.latent_channels
        x = inputs[0]  # (2, 2C + 1, h, w): [unconditional; conditional]
        seen[form] = x
        _, _, pixels, grid_mask = prepare_inputs(image, mask, editor.factor)
        real = torch.nn.functional.interpolate(grid_mask, size=x.shape[-2:])  # nearest
        assert torch.equal(x[1, c : c + 1], real[0])  # the conditional half: the real mask
        if form == "paper":
            assert torch.equal(x[0, c], torch.ones_like(x[0, c]))  # the empty mask
            dist = editor.vae.encode(torch.zeros_like(pixels)).latent_dist  # the gray image
            scale = editor.vae.config.scaling_factor
            off = (x[0, c + 1 :] - dist.mean[0] * scale).abs() / (dist.std[0] * scale)
            assert off.max() < 5  # a posterior sample of the gray image's latent
            assert not torch.allclose(x[0, c + 1 :], x[1, c + 1 :])
        else:
            assert torch.equal(x[0, c:], x[1, c:])  # the same mask and image in both halves
    assert torch.equal(seen["paper"][1], seen["diffusers"][1])  # the same conditional input


def test_uses_no_unconditional_batch_without_guidance(editor: DiffEditor) -> None:
    image, mask = image_and_mask(16, 24)
    batches: list[int] = []
    hook = editor.unet.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    try:
        editor.generate(image, mask, TEXT, seed=0, steps=2, guidance_scale=1.0)
        editor.generate(image, mask, TEXT, seed=0, steps=2, guidance_scale=2.0)
    finally:
        hook.remove()
    assert batches == [1, 1, 2, 2]


@pytest.mark.parametrize("kind", ["pil", "numpy", "uint8", "float"])
def test_edit_keeps_pixels_outside_the_mask(editor: DiffEditor, kind: str) -> None:
    image, mask = image_and_mask(45, 70, seed=1)  # off the grid: resized to 40x64 and back
    given = {
        "pil": Image.fromarray(image),
        "numpy": image,
        "uint8": torch.from_numpy(image).permute(2, 0, 1),
        "float": torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1,
    }[kind]
    out = editor.edit(given, torch.from_numpy(mask), TEXT, seed=0, num_images=2)
    assert len(out) == 2
    if kind == "pil":
        assert out[0].size == (70, 45)
        out = np.stack([np.asarray(o) for o in out])
    if kind in ("uint8", "float"):
        assert out.shape == (2, 3, 45, 70) and out.dtype == given.dtype
        out = out.permute(0, 2, 3, 1).numpy()
        given = given.permute(1, 2, 0).numpy()
    else:
        given = image
    assert out.shape == (2, 45, 70, 3)
    assert np.array_equal(out[:, ~mask], np.broadcast_to(given[~mask], out[:, ~mask].shape))
    assert not np.array_equal(out[:, mask], np.broadcast_to(given[mask], out[:, mask].shape))


def test_edit_is_seeded(editor: DiffEditor) -> None:
    image, mask = image_and_mask(32, 24)
    a = editor.edit(image, mask, TEXT, seed=5, guidance_scale=3.0)
    b = editor.edit(image, mask, TEXT, seed=5, guidance_scale=3.0)
    c = editor.edit(image, mask, TEXT, seed=6, guidance_scale=3.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_feather_band() -> None:
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:25, 8:32] = True  # 20 x 24
    feather = 3
    w = feather_weights(mask, feather).numpy()
    assert (w[~mask] == 0).all()
    # along a row through the middle, from the left border inwards: d = 1, 2, 3, 4, ...
    row = w[15, 8:20]
    np.testing.assert_allclose(row[:feather], np.arange(1, feather + 1) / (feather + 1))
    assert (row[feather:] == 1).all()
    assert (w[5 + feather : 25 - feather, 8 + feather : 32 - feather] == 1).all()
    assert ((w > 0) & (w < 1)).sum() > 0 and (w[mask] > 0).all()
    assert np.array_equal(feather_weights(mask, 0).numpy(), mask.astype(np.float32))
    # the image's own border is no seam
    full = feather_weights(np.ones((6, 6), dtype=bool), 3).numpy()
    assert (full == 1).all()


def test_edit_feathers_only_inside_the_mask(editor: DiffEditor) -> None:
    image, mask = image_and_mask(40, 48, seed=2)
    hard = editor.edit(image, mask, TEXT, seed=0, feather=0)[0]
    soft = editor.edit(image, mask, TEXT, seed=0, feather=3)[0]
    w = feather_weights(mask, 3).numpy()
    assert np.array_equal(hard[w == 1], soft[w == 1])  # deep inside: the generated image
    assert np.array_equal(soft[w == 0], image[w == 0])  # outside: the input
    band = (w > 0) & (w < 1)
    expected = np.round(image[band] * (1 - w[band, None]) + hard[band] * w[band, None])
    assert np.abs(soft[band].astype(float) - expected).max() <= 1


def test_errors(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DiffEditor.from_pretrained(tmp_path / "nowhere")
    t2i = tiny_inpaint_components(in_channels=4, tokenizer_folder=tok_dir)
    with pytest.raises(ValueError, match="BlendedLatentEditor"):
        DiffEditor(**t2i)
    inpaint = tiny_inpaint_components(in_channels=9, tokenizer_folder=tok_dir)
    with pytest.raises(ValueError, match="DiffEditor"):
        BlendedLatentEditor(**inpaint)
    with pytest.raises(ValueError, match="unmasked_inpainting=false"):
        BlendedLatentEditor(**t2i, unmasked_inpainting=True)


# ---------------------------------------------------------------------------------------------
# Blended Latent Diffusion


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_blended_keeps_the_noised_source_outside_the_mask(
    text2image_folder: Path, guidance: float
) -> None:

    editor = BlendedLatentEditor.from_pretrained(
        text2image_folder, steps=8, skip=0.25, variant="sd_script"
    )
    image, mask = image_and_mask(48, 64)
    record: list[tuple] = []
    editor.edit(
        image,
        mask,
        TEXT,
        seed=0,
        guidance_scale=guidance,
        callback=lambda i, t, z, s: record.append((i, int(t), z.clone(), s)),
    )
    assert_blended(record, text2image_folder, steps=8)


def assert_blended(record: list[tuple], folder: Path, steps: int) -> None:
    """After every step the latents outside the latent mask are the source noised to that
    step (DDIM, the first 25% of the steps skipped); inside they are not."""
    from diffusers import DDIMScheduler

    reference = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    reference.set_timesteps(steps)
    assert [t for _, t, _, _ in record] == reference.timesteps[steps // 4 :].tolist()
    alphas = reference.alphas_cumprod
    for _, t, z, s in record:
        m = s["mask"]
        assert m.shape == (1, 1, 6, 8) and 0 < m.sum() < m.numel()
        noised = alphas[t].sqrt() * s["source_latents"] + (1 - alphas[t]).sqrt() * s["noise"]
        outside = (m == 0).expand_as(z)
        torch.testing.assert_close(z[outside], noised[outside], atol=1e-6, rtol=0)
        assert not torch.allclose(z[~outside], noised[~outside])


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_blended_on_an_inpainting_unet_feeds_the_empty_mask_condition(
    inpaint_folder: Path, guidance: float
) -> None:
    editor = BlendedLatentEditor.from_pretrained(
        inpaint_folder, steps=4, skip=0.25, unmasked_inpainting=True, variant="sd_script"
    )
    c = editor.vae.config.latent_channels
    seen: list[torch.Tensor] = []
    hook = editor.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    image, mask = image_and_mask(48, 64)
    record: list[tuple] = []
    try:
        out = editor.edit(
            image, mask, TEXT, seed=0, guidance_scale=guidance,
            callback=lambda i, t, z, s: record.append((i, int(t), z.clone(), s)),
        )  # fmt: skip
    finally:
        hook.remove()
    assert out.shape == (1, 48, 64, 3) and len(seen) == 3  # 4 steps, the first skipped
    batch = 2 if guidance > 1 else 1
    for x in seen:
        assert x.shape == (batch, 2 * c + 1, 6, 8)
        assert bool((x[:, c] == 1).all())  # the all-ones mask: nothing of the image is kept
        torch.testing.assert_close(x[:, c + 1 :], seen[0][:1, c + 1 :].expand(batch, -1, -1, -1))
    gray = editor.vae.encode(torch.zeros(1, 3, 48, 64)).latent_dist  # the gray image's latent
    z = seen[0][0, c + 1 :] / editor.vae.config.scaling_factor
    assert bool(((z - gray.mean[0]).abs() <= 6 * gray.std[0]).all())
    assert_blended(record, inpaint_folder, steps=4)  # the blend as on a text-to-image UNet


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_blended_as_its_papers_algorithm_1(text2image_folder: Path, guidance: float) -> None:
    """variant="paper": start from the source (posterior mean) noised to the first timestep,
    before every step replace the latents outside the mask by the source noised to that step's
    t, skip no step; the UNet sees exactly those latents."""
    from diffusers import DDIMScheduler

    editor = BlendedLatentEditor.from_pretrained(text2image_folder, steps=6, variant="paper")
    image, mask = image_and_mask(48, 64)
    seen: list[torch.Tensor] = []
    hook = editor.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    record: list[tuple] = []
    try:
        editor.edit(
            image, mask, TEXT, seed=0, guidance_scale=guidance,
            callback=lambda i, t, z, s: record.append((i, int(t), z.clone(), s)),
        )  # fmt: skip
    finally:
        hook.remove()
    reference = DDIMScheduler.from_pretrained(text2image_folder, subfolder="scheduler")
    reference.set_timesteps(6)
    assert [t for _, t, _, _ in record] == reference.timesteps.tolist()  # no step skipped
    alphas = reference.alphas_cumprod
    src = record[0][3]["source_latents"]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean = editor.vae.encode(pixels).latent_dist.mean * editor.vae.config.scaling_factor
    torch.testing.assert_close(src, mean)  # the posterior mean, not a sample
    first_noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(0))
    t0 = record[0][1]
    start = alphas[t0].sqrt() * src + (1 - alphas[t0]).sqrt() * first_noise
    m = record[0][3]["mask"]
    inside = (m == 1).expand_as(src)
    torch.testing.assert_close(seen[0][:1][inside], start[inside], atol=1e-5, rtol=0)
    previous = start
    for (_, t, z, s), x in zip(record, seen):
        noised = alphas[t].sqrt() * src + (1 - alphas[t]).sqrt() * s["noise"]
        blended = m * previous + (1 - m) * noised  # before the step
        torch.testing.assert_close(x[:1], blended, atol=1e-5, rtol=0)
        previous = z


def test_blended_mask_dilation_and_composite(text2image_folder: Path) -> None:
    editor = BlendedLatentEditor.from_pretrained(text2image_folder, steps=4, dilation=1)
    mask = torch.zeros(1, 1, 48, 64)
    mask[..., 16:24, 24:32] = 1  # one latent cell: (2, 3)
    m = editor.latent_mask(mask)[0, 0]
    assert m.sum() == 9 and m[1:4, 2:5].all()
    image, pixel_mask = image_and_mask(45, 70)
    plain = editor.edit(image, pixel_mask, TEXT, seed=0)
    pasted = editor.edit(image, pixel_mask, TEXT, seed=0, composite=True, feather=2)
    assert plain.shape == pasted.shape == (1, 45, 70, 3)
    assert not np.array_equal(plain[0][~pixel_mask], image[~pixel_mask])  # VAE background
    assert np.array_equal(pasted[0][~pixel_mask], image[~pixel_mask])


def test_configs_instantiate_the_editors(inpaint_folder: Path, text2image_folder: Path) -> None:
    from hydra.utils import instantiate

    from semani.manipulation.editor import Editor
    from tests.conftest import compose

    diff = instantiate(compose("manipulate", [f"editor.source={inpaint_folder}"]).editor)
    assert isinstance(diff, DiffEditor) and isinstance(diff, Editor)
    assert (diff.steps, diff.guidance_scale, type(diff.scheduler).__name__) == (
        50,
        7.5,
        "DDIMScheduler",
    )
    assert (diff.side, diff.token_grid, diff.device.type) == (512, None, "cpu")
    cfg = compose("manipulate", ["method=blended_ldm", f"editor.source={text2image_folder}"])
    blended = instantiate(cfg.editor)
    assert isinstance(blended, BlendedLatentEditor) and blended.skip == 0.25
    assert isinstance(blended, Editor)


def test_bf16_and_vae_tiling(inpaint_folder: Path) -> None:
    editor = DiffEditor.from_pretrained(inpaint_folder, dtype="bfloat16", vae_tiling=True)
    assert editor.unet.dtype == editor.vae.dtype == torch.bfloat16 and editor.vae.use_tiling
    image, mask = image_and_mask(72, 96)  # larger than the tiny VAE's 64 px tiles
    out = editor.edit(image, mask, TEXT, seed=0, steps=2)
    assert out.shape == (1, 72, 96, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0][~mask], image[~mask])


def test_check_diff_shapes_reports_colours_and_keeps_outside_pixels(
    inpaint_folder: Path, shapes_root: Path
) -> None:
    """scripts/check_diff_shapes.py on a random model: well-formed numbers, outside untouched."""
    import sys

    from tests.conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from check_diff_shapes import main, nearest_colour
    finally:
        sys.path.pop(0)
    from semani.data.shapes_generator import COLORS

    rgb = np.array([COLORS["red"], COLORS["blue"], (250, 30, 40)], dtype=np.uint8)
    assert [list(COLORS)[i] for i in nearest_colour(rgb)] == ["red", "blue", "red"]
    result = main(["--model", str(inpaint_folder), "--data", str(shapes_root), "--n", "3",
                   "--steps", "2"])  # fmt: skip
    assert result["n"] == 3 and result["outside_changed"] == 0
    assert 0.0 <= result["colour_success"] <= 1.0 and result["chance"] == 1 / len(COLORS)
    assert 0.0 <= result["vae_ceiling"] <= 1.0
    assert set(result["success_by_size"]) <= {"small", "medium", "large"}


def test_an_sd2_layout_folder(tmp_path: Path, tok_dir: Path) -> None:
    """SD-2-inpainting's layout (the paper's base model) at toy widths: per-level heads, linear
    projections, a GELU text tower, a tokenizer that pads with "!"; read from its folder as
    diffusers does, and equal to diffusers' own pipeline."""
    from diffusers import StableDiffusionInpaintPipeline

    parts = tiny_inpaint_components(
        seed=1, block_out_channels=(32, 64), attention_head_dim=(2, 4),
        use_linear_projection=True, text_act="gelu", pad_token="!", tokenizer_folder=tok_dir,
    )  # fmt: skip
    pipe = StableDiffusionInpaintPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(tmp_path / "sd2")
    editor = DiffEditor.from_pretrained(tmp_path / "sd2", guidance_form="diffusers")
    assert editor.tokenizer.pad_token == "!" and editor.tokenizer.pad_token_id == 0
    assert editor.unet.config.use_linear_projection
    assert editor.text_encoder.config.hidden_act == "gelu"
    ids = editor.tokenizer("a bird", padding="max_length", max_length=77).input_ids
    assert ids[3] == 49407 and ids[4:] == [0] * 73  # SOT, a, bird, EOT, then "!" (id 0)
    image, mask = image_and_mask(32, 48)
    white = Image.fromarray(mask.astype(np.uint8) * 255)
    ref = pipe(
        TEXT, image=Image.fromarray(image), mask_image=white, height=32, width=48,
        num_inference_steps=3, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(2), output_type="np",
    ).images  # fmt: skip
    ours = editor.generate(image, mask, TEXT, seed=2, steps=3, guidance_scale=5.0)
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("strength", [0.6, 0.3])
def test_strength_matches_diffusers_pipeline(pipe, inpaint_folder: Path, strength: float) -> None:
    """strength < 1 ("keep the shape, change the look"): the image's own latents noised to that
    fraction of the schedule, as diffusers' inpainting pipeline does."""
    from diffusers import DDIMScheduler

    editor = DiffEditor.from_pretrained(inpaint_folder, guidance_form="diffusers")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the editor's default
    image, mask = image_and_mask(48, 80)
    ref = pipe(
        TEXT, image=Image.fromarray(image),
        mask_image=Image.fromarray(mask.astype(np.uint8) * 255), height=48, width=80,
        num_inference_steps=5, guidance_scale=4.0, strength=strength,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images  # fmt: skip
    ours = editor.generate(image, mask, TEXT, seed=3, steps=5, guidance_scale=4.0,
                           strength=strength)  # fmt: skip
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-4, rtol=0)
    steps: list[int] = []
    editor.generate(image, mask, TEXT, seed=3, steps=5, strength=strength,
                    callback=lambda i, t, z: steps.append(int(t)))  # fmt: skip
    assert len(steps) == int(5 * strength)
    with pytest.raises(ValueError, match="strength"):
        editor.generate(image, mask, TEXT, seed=3, steps=5, strength=0.0)


def test_native_side_is_the_models_own_size(inpaint_folder: Path) -> None:
    """side="native": the UNet's sample_size times the VAE factor; an image of another size is
    edited at that size and pasted back at its own, every outside pixel kept."""
    editor = DiffEditor.from_pretrained(inpaint_folder, steps=2, side="native")
    native = editor.unet.config.sample_size * editor.factor
    assert editor.side == native
    seen = []
    unet_forward = editor.unet.forward

    def spy(sample, *args, **kwargs):
        seen.append(tuple(sample.shape[-2:]))
        return unet_forward(sample, *args, **kwargs)

    editor.unet.forward = spy
    image, mask = image_and_mask(2 * native, 3 * native)  # larger than the model's size
    out = np.asarray(editor.edit(image, mask, TEXT, seed=0)[0])
    assert out.shape == image.shape and (out[~mask] == image[~mask]).all()
    h, w = seen[0]
    assert max(h, w) * editor.factor == native  # the longer side at the native size
    with pytest.raises(ValueError, match="native"):
        DiffEditor.from_pretrained(inpaint_folder, side="large")


def test_autoencode_is_the_vae_round_trip_on_the_model_grid(inpaint_folder: Path) -> None:
    editor = DiffEditor.from_pretrained(inpaint_folder, side="native")
    image = torch.rand(3, 48, 80) * 2 - 1
    out = editor.autoencode(image)
    assert out.shape == (48, 80, 3) and out.dtype == np.uint8
    size = model_size(48, 80, editor.factor, editor.side)
    small = torch.nn.functional.interpolate(image[None], size, mode="bilinear",
                                            antialias=True, align_corners=False)  # fmt: skip
    vae = editor.vae
    with torch.inference_mode():
        mean = vae.encode(small.clamp(-1, 1)).latent_dist.mean
        ref = editor.decode(mean * vae.config.scaling_factor)
    ref = torch.nn.functional.interpolate(ref, (48, 80), mode="bilinear", antialias=True,
                                          align_corners=False)[0]  # fmt: skip
    ref = (ref.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
