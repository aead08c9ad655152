"""Inference-only editors: re-generate a masked region of an image after a text.

`editor.Editor` is the contract every editor honours (`trans.TransEditor`,
`diff_editor.DiffEditor`, `blended.BlendedLatentEditor`); `pixels` holds the pixel side they
share (input forms, model grid, the exact composite). The editors import their libraries
(diffusers, the transformer) when their module is imported, not here.
"""

from semani.manipulation.editor import SAMPLER_OPTIONS, Editor, sampler_options

__all__ = ["SAMPLER_OPTIONS", "Editor", "sampler_options"]
