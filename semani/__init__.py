"""SeMani: entity-level text-guided image manipulation.

`semani.EntityEditPipeline` is the method (find the entity a word names, then regenerate it from
a text; `semani.pipeline`); `semani.load_model(path, **overrides)` opens any of the project's
checkpoints in eval mode (`semani.loading`).
"""

from __future__ import annotations

from typing import Any

from semani.utils.resolvers import register_resolvers

__version__ = "0.1.0"
__all__ = ["EditResult", "EntityEditPipeline", "load_model", "__version__"]

register_resolvers()


def load_model(path: Any, device: Any = None, **overrides: Any) -> Any:
    """Open one of our checkpoints (VQGAN, SeMani-Trans, ...) in eval mode; see
    `semani.loading.load_model` for the overrides."""
    from semani.loading import load_model as _load_model

    return _load_model(path, device=device, **overrides)


def __getattr__(name: str) -> Any:  # the pipeline imports torch and the alignment phase: lazily
    if name in ("EntityEditPipeline", "EditResult"):
        from semani import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'semani' has no attribute {name!r}")
