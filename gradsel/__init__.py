"""gradsel: choose which parameters of a pretrained model to fine-tune, by the Fisher information."""

from .errors import GradselError
from .fisher import Fisher, fisher, fisher_loop

__version__ = "0.1.0"

__all__ = ["GradselError", "Fisher", "fisher", "fisher_loop", "__version__"]
