"""``torch.func.functional_call`` that leaves a model whose submodule sits at two paths as it found it.

timm's CoaT registers each ``ConvPosEnc`` both on the model (``cpe1``) and in its blocks
(``serial_blocks1.0.cpe``). With ``tie_weights=True`` (torch's default), ``functional_call`` (torch 2.14.1)
swaps the tensor in at both paths, which are one slot of one module, and on the way out restores the second
path with what the first swap put there: the module keeps the swapped-in tensor instead of its
``nn.Parameter``. The model then trains without it, silently (a detached tensor has no gradient).
:func:`swapped_call` passes every distinct slot (module, attribute) once, under the path where it is first
met, with the tensor of the name that ``named_parameters()`` / ``named_buffers()`` give it. A parameter tied
across different modules (GPT-2's LM head and token embedding) still gets the tensor at each of its slots,
and the call runs with ``tie_weights=False``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call


def tensor_slots(module: nn.Module) -> dict[str, list[str]]:
    """Canonical name of each parameter and buffer (as ``named_parameters()`` / ``named_buffers()`` give it)
    -> the paths of every distinct slot that holds that tensor.

    >>> lin = nn.Linear(2, 2)
    >>> m = nn.ModuleDict({"a": lin, "b": nn.ModuleDict({"shared": lin})})
    >>> tensor_slots(m)["a.weight"]
    ['a.weight']
    """
    slots: dict[str, list[str]] = {}
    canonical: dict[int, str] = {}
    seen: set[tuple[int, str]] = set()
    for kind in ("_parameters", "_buffers"):
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for attr, t in getattr(mod, kind).items():
                if t is None or (id(mod), attr) in seen:
                    continue
                seen.add((id(mod), attr))
                path = f"{mod_name}.{attr}" if mod_name else attr
                slots.setdefault(canonical.setdefault(id(t), path), []).append(path)
    return slots


def swapped_call(module: nn.Module, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict | None = None,
                 slots: dict[str, list[str]] | None = None) -> Any:
    """``module(*args, **kwargs)`` with ``tensors`` (canonical names) in place of its parameters and buffers;
    ``slots``: :func:`tensor_slots` of ``module``, when the caller keeps it."""
    slots = tensor_slots(module) if slots is None else slots
    expanded = {path: t for name, t in tensors.items() for path in slots.get(name, (name,))}
    return functional_call(module, expanded, args, kwargs, tie_weights=False)
