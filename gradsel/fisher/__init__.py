"""Fisher information estimators."""

from .estimate import eval_mode, fisher, fisher_loop
from .result import Fisher

__all__ = ["Fisher", "fisher", "fisher_loop", "eval_mode"]
