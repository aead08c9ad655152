"""The editor contract: what `semani.pipeline.EntityEditPipeline` needs from an editor.

Every editor of this package honours it:

| editor (`semani.manipulation.`) | model | token grid |
|---|---|---|
| `trans.TransEditor` | SeMani-Trans (VQGAN tokens + transformer) | the VQGAN's, e.g. (16, 16) |
| `diff_editor.DiffEditor` | SeMani-Diff (latent-diffusion inpainting) | none |
| `blended.BlendedLatentEditor` | Blended Latent Diffusion (the baseline) | none |

`edit(image, mask, text, seed=...)` takes an image of any size in any form of
`semani.manipulation.pixels` and a mask of the same size, and returns a list of edited images
of the input's size and form (one by default). `token_grid` is the grid the editor re-generates
on (None for pixel/latent editors): the alignment phase then makes proposals that cover fewer
than `min_tokens` of its cells ineligible. Sampler settings (`steps`, `guidance_scale`) are extra
keyword arguments of `edit` where an editor has them (`sampler_options`). An editor may also
have `edit_many(image, masks, texts, seed=...)`, several entities in one chain (SeMani-Trans:
on its running tokens); the pipeline uses it for multi-entity edits.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

__all__ = ["SAMPLER_OPTIONS", "Editor", "sampler_options"]

# the sampler settings a user may set per edit (the app's sliders, manipulate.py's editor.<key>)
SAMPLER_OPTIONS = ("steps", "guidance_scale")


@runtime_checkable
class Editor(Protocol):
    """Re-generates the masked region of an image after a text (see the module docstring)."""

    token_grid: tuple[int, int] | None  # the (h, w) grid it edits on; None: pixels/latents
    min_tokens: int  # a mask must cover at least this many cells of `token_grid`

    def edit(
        self, image: Any, mask: Any, text: str, seed: int | None = None, **sampler: Any
    ) -> list[Any]: ...


def sampler_options(editor: Editor) -> tuple[str, ...]:
    """The `SAMPLER_OPTIONS` that `editor.edit` accepts (e.g. SeMani-Trans takes none)."""
    params = inspect.signature(editor.edit).parameters
    return tuple(k for k in SAMPLER_OPTIONS if k in params)
