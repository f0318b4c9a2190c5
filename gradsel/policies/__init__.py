"""Selection policies: the registry and the built-ins (one file each)."""

from . import fish, ird, jsdrift, random, reverse  # noqa: F401  (registers the built-ins)
from .base import Context, Policy, masks_from_flat, split_budget, top_k
from .registry import get_policy, list_policies, register_policy, unregister_policy

__all__ = ["Policy", "Context", "top_k", "split_budget", "masks_from_flat", "register_policy",
           "list_policies", "get_policy", "unregister_policy"]
