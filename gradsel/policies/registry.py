"""The policy registry: one decorator to register, one function to list, one to look up."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from ..errors import GradselError
from .base import FunctionPolicy, Policy

__all__ = ["register_policy", "list_policies", "get_policy", "unregister_policy"]

_REGISTRY: dict[str, type[Policy] | Callable] = {}


def register_policy(name: str | Callable | type | None = None):
    """Register a policy class (a :class:`Policy` subclass) or a function ``fn(ctx, **options) -> masks``.

    Used bare (``@register_policy``, keyed by the lower-cased class or function name) or with a name
    (``@register_policy("mine")``). Registering a taken name raises.

    >>> import gradsel
    >>> @gradsel.register_policy("first_k_doc_example")
    ... def first_k(ctx):
    ...     return gradsel.policies.top_k({n: -torch.arange(float(torch.Size(s).numel())).reshape(s)
    ...                                   for n, s in ctx.shapes.items()}, ctx.k)
    >>> "first_k_doc_example" in gradsel.list_policies()
    True
    >>> gradsel.policies.unregister_policy("first_k_doc_example")
    """
    def add(obj, key: str | None):
        key = key or obj.__name__.lower()
        if key in _REGISTRY:
            raise GradselError(f"a policy named {key!r} is registered already: pick another name "
                               "(or unregister_policy it first)")
        if isinstance(obj, type):
            if not issubclass(obj, Policy):
                raise GradselError(f"{obj.__name__} is not a gradsel.Policy subclass or a function")
            obj.name = key
        elif not callable(obj):
            raise GradselError(f"cannot register {obj!r} as a policy: give a Policy subclass or a function")
        _REGISTRY[key] = obj
        return obj

    if name is None or isinstance(name, str):
        return lambda obj: add(obj, name)
    return add(name, None)


def unregister_policy(name: str) -> None:
    """Remove a registered policy (for tests and notebooks)."""
    if name not in _REGISTRY:
        raise GradselError(f"no policy named {name!r} is registered")
    del _REGISTRY[name]


def list_policies(pattern: str | None = None) -> list[str]:
    """Registered policy names, sorted; ``pattern`` filters with shell wildcards (``"*fish*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names


def get_policy(policy: str | Policy, **options: Any) -> Policy:
    """An instance of the named policy with ``options``, or ``policy`` itself if it is an instance."""
    if isinstance(policy, Policy):
        if options:
            raise GradselError(f"options {sorted(options)} were given with a policy instance; set them on "
                               "the instance instead")
        return policy
    if not isinstance(policy, str):
        raise GradselError(f"policy must be a registered name or a Policy instance, got {type(policy).__name__}")
    if policy not in _REGISTRY:
        raise GradselError(f"unknown policy {policy!r}; registered: {', '.join(list_policies())}")
    obj = _REGISTRY[policy]
    try:
        inst = obj(**options) if isinstance(obj, type) else FunctionPolicy(obj, **options)
    except TypeError as exc:
        raise GradselError(f"policy {policy!r} does not take these options: {exc}") from None
    inst.name = policy
    return inst
