"""gradsel: choose which parameters of a pretrained model to fine-tune, by the Fisher information."""

from . import delta, optim, params, policies
from .errors import GradselError
from .fisher import Fisher, fisher, fisher_loop
from .masking import MaskHandle
from .policies import Context, Policy, list_policies, register_policy
from .selection import Selection, select

__version__ = "0.1.0"

__all__ = ["GradselError", "Fisher", "fisher", "fisher_loop", "select", "Selection", "MaskHandle", "Policy",
           "Context", "register_policy", "list_policies", "__version__"]
