"""SeMani: entity-level text-guided image manipulation.

`semani.load_model(path, **overrides)` opens any of the project's checkpoints in eval mode (see
`semani.loading`).
"""

from __future__ import annotations

from typing import Any

from semani.utils.resolvers import register_resolvers

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]

register_resolvers()


def load_model(path: Any, device: Any = None, **overrides: Any) -> Any:
    """Open one of our checkpoints (VQGAN, SeMani-Trans, ...) in eval mode; see
    `semani.loading.load_model` for the overrides."""
    from semani.loading import load_model as _load_model

    return _load_model(path, device=device, **overrides)
