"""The latent-diffusion editors' posterior cache (`latent_cache`): a repeated edit of a photo
skips the VAE encoder where its input repeats, and every result is the uncached one, bit for
bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semani.manipulation.blended import BlendedLatentEditor
from semani.manipulation.diff_editor import DiffEditor
from semani.modules.diffusion_parts import tiny_inpaint_components
from tests.test_diff_editor import image_and_mask


def _counting(editor) -> list[tuple[int, ...]]:
    """Record the shape of every input the editor's VAE encodes."""
    calls: list[tuple[int, ...]] = []
    encode = editor.vae.encode

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return encode(x, *args, **kwargs)

    editor.vae.encode = counted
    return calls


@pytest.mark.parametrize(
    "strength, guidance_form", [(1.0, "paper"), (0.6, "paper"), (1.0, "diffusers")]
)
def test_diff_editor_repeated_edit_reuses_posteriors_with_equal_results(
    inpaint_folder: Path, strength: float, guidance_form: str
) -> None:
    kw = dict(steps=3, strength=strength, guidance_form=guidance_form)
    cached = DiffEditor.from_pretrained(inpaint_folder, latent_cache=4, **kw)
    plain = DiffEditor.from_pretrained(inpaint_folder, latent_cache=0, **kw)
    calls = _counting(cached)
    image, mask = image_and_mask(48, 64)
    other = mask.copy()
    other[:10] = True  # a second entity's mask on the same photo
    edits = [("a red bird", mask, 0), ("a blue bird", mask, 1), ("a tree", other, 2)]
    encodes_per_edit = (strength < 1) + 1 + (guidance_form == "paper")
    for i, (text, m, seed) in enumerate(edits):
        before = len(calls)
        got = cached.edit(image, m, text, seed=seed)
        want = plain.edit(image, m, text, seed=seed)
        assert np.array_equal(got, want), (text, i)
        # first edit: every input new; same mask again: none; a new mask: its masked image
        assert len(calls) - before == [encodes_per_edit, 0, 1][i], (text, i)
    assert cached.latent_cache.hits == encodes_per_edit + encodes_per_edit - 1


def test_blended_editor_reuses_the_source_posterior(tok_dir: Path) -> None:
    def parts():  # the same seeded weights, modules of their own
        return tiny_inpaint_components(in_channels=4, tokenizer_folder=tok_dir)

    cached = BlendedLatentEditor(**parts(), steps=3, latent_cache=2)
    plain = BlendedLatentEditor(**parts(), steps=3, latent_cache=0)
    calls = _counting(cached)
    image, mask = image_and_mask(48, 64, seed=3)
    for seed in (0, 1):
        got = cached.edit(image, mask, "a red bird", seed=seed)
        assert np.array_equal(got, plain.edit(image, mask, "a red bird", seed=seed))
    assert len(calls) == 1 and cached.latent_cache.hits == 1


def test_cache_keeps_the_last_n_inputs_and_is_keyed_by_exact_bytes(inpaint_folder: Path) -> None:
    editor = DiffEditor.from_pretrained(inpaint_folder, latent_cache=2)
    calls = _counting(editor)
    a, b, c = (
        torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)
    )
    for x in (a, b, a, c, b):  # a hit; c pushes out b (a was used later); b again: a miss
        editor.posterior(x)
    assert len(calls) == 4 and editor.latent_cache.hits == 1
    nudged = a.clone()
    nudged[0, 0, 0, 0] += 1e-6  # one value changed: another input
    editor.posterior(nudged)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="number of inputs"):
        DiffEditor.from_pretrained(inpaint_folder, latent_cache=-1)
