"""Which parameters a method looks at: name specs, globs, module classes, callables."""

from __future__ import annotations

import fnmatch
import sys
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .errors import GradselError

__all__ = ["ParamSpec", "resolve", "named_parameters", "is_peft_model", "adapter_names", "unwrap_model",
           "strip_wrapper_prefix", "WRAPPER_PREFIXES"]

ParamSpec = Union[str, type, Callable[[str, torch.Tensor], bool], Iterable]


#: name prefixes that wrappers add: torch.compile's ``OptimizedModule`` and DDP-style ``.module`` wrappers
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_MODULE_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside ``torch.compile`` and DDP-style wrappers (any nesting).

    Peels torch._dynamo's ``OptimizedModule`` (``._orig_mod``) and every wrapper whose class is, or derives
    from, a class named ``DistributedDataParallel``, ``DataParallel`` or ``DeepSpeedEngine`` (``.module``),
    so that parameter names never carry the ``_orig_mod.`` / ``module.`` prefixes.

    >>> import torch.nn as nn
    >>> inner = nn.Linear(2, 2)
    >>> unwrap_model(nn.DataParallel(inner)) is inner
    True
    """
    while True:
        dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can be compiled yet
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif (any(c.__name__ in _MODULE_WRAPPERS for c in type(model).__mro__)
              and isinstance(getattr(model, "module", None), nn.Module)):
            model = model.module
        else:
            return model


def strip_wrapper_prefix(name: str) -> str:
    """``name`` without the wrapper prefixes it starts with (``"module._orig_mod.fc.weight"`` → ``"fc.weight"``)."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All parameters of ``model`` by name, tied ones once (the order of ``named_parameters``)."""
    return dict(model.named_parameters())


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft ``PeftModel`` (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of a peft model's adapter parameters: those of its tuner (``lora_A``/``lora_B``, ``ia3_l``, ``hada_w1_a``
    and the like) or, for prompt learning (prompt and prefix tuning, p-tuning), of its prompt encoder."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return [n for n, p in model.named_parameters() if n.startswith("prompt_encoder.") and p.requires_grad]
    prefix = getattr(getattr(model, "base_model", None), "prefix", None) or "lora_"
    return [n for n, p in model.named_parameters() if prefix in n and p.requires_grad]


def _flatten_specs(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, (str, type)) or callable(spec) and not isinstance(spec, (list, tuple, set)):
        return [spec]
    return list(spec)


def _describe(spec) -> str:
    if isinstance(spec, type):
        return f"module class {spec.__name__}"
    if isinstance(spec, str):
        return repr(spec)
    return f"callable {getattr(spec, '__name__', spec)!r}"


def _match(model: nn.Module, params: dict[str, nn.Parameter], spec) -> list[str]:
    if isinstance(spec, str):
        if spec in params:
            return [spec]
        return [n for n in params if fnmatch.fnmatchcase(n, spec)]
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise GradselError(f"{spec.__name__} is not an nn.Module class; pass module classes, names or globs")
        ids = {id(p) for m in model.modules() if isinstance(m, spec) for p in m.parameters(recurse=False)}
        return [n for n, p in params.items() if id(p) in ids]
    if callable(spec):
        return [n for n, p in params.items() if spec(n, p)]
    raise GradselError(f"cannot read parameter spec {spec!r}: use a name, a glob, an nn.Module class or a callable")


def _no_match(what: str, spec, model: nn.Module, params: dict) -> GradselError:
    if isinstance(spec, str) and strip_wrapper_prefix(spec) != spec:
        plain = strip_wrapper_prefix(spec)
        return GradselError(f"{what}={spec!r} starts with the wrapper prefix {spec[:len(spec) - len(plain)]!r} "
                            "(torch.compile / DDP), but gradsel names parameters as the unwrapped model does: "
                            f"pass {what}={plain!r}")
    return GradselError(f"{what}={_describe(spec)} matches no parameter of {type(model).__name__}. "
                        f"Parameter names look like: {', '.join(list(params)[:6])}, ... "
                        "Use exact names, globs such as 'encoder.*', module classes or a callable.")


def resolve(model: nn.Module, params: ParamSpec | None = None, exclude: ParamSpec | None = None,
            *, what: str = "params") -> list[str]:
    """Names of the parameters that ``params`` picks from ``model``, minus ``exclude``.

    ``params`` may be a name, a glob (``"encoder.*.weight"``), an ``nn.Module`` class, a callable
    ``(name, param) -> bool`` or a list of these. ``None`` means every parameter with
    ``requires_grad``, or a peft model's adapter parameters. Names are those of
    :func:`unwrap_model` (no ``torch.compile`` / DDP prefixes).

    Raises:
        GradselError: when a spec matches no parameter, or nothing is left.

    >>> import torch.nn as nn
    >>> resolve(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), "2.*")
    ['2.weight', '2.bias']
    """
    model = unwrap_model(model)
    all_params = named_parameters(model)
    if params is None:
        names = adapter_names(model) if is_peft_model(model) else [n for n, p in all_params.items() if p.requires_grad]
    else:
        chosen: set[str] = set()
        for spec in _flatten_specs(params):
            hit = _match(model, all_params, spec)
            if not hit:
                raise _no_match(what, spec, model, all_params)
            chosen.update(hit)
        names = [n for n in all_params if n in chosen]
    for spec in _flatten_specs(exclude):
        hit = set(_match(model, all_params, spec))
        if not hit:
            raise _no_match("exclude", spec, model, all_params)
        names = [n for n in names if n not in hit]
    if not names:
        raise GradselError(f"no candidate parameters are left for {type(model).__name__}: "
                           "check params=/exclude= and that some parameters require grad")
    return names
