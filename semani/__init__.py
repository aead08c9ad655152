"""SeMani: entity-level text-guided image manipulation."""

__version__ = "0.1.0"
