"""Fisher engines beyond the two in ``estimate.py`` (the vmap engine and the reference loop)."""

from .hooks import HooksEngine

__all__ = ["HooksEngine"]
