"""Per-sample gradients of parameters that a model multiplies or adds into an activation.

A layer scale held by the block itself (timm ConvNeXt's ``x.mul(self.gamma.reshape(1, -1, 1, 1))``, HF ConvNext's
``self.layer_scale_parameter * x``) has no module of its own: the hooks engine would take the module-local
gradient of the whole block, a per-sample re-run of everything in it. While the batched forward runs,
:class:`ElementwiseUses` (a ``TorchFunctionMode``) watches such parameters: a use that reshapes one (``reshape``,
``view``, ``unsqueeze``, ``flatten``, indexing with ``None`` and full slices) and then multiplies or adds it into
a tensor that carries the batch (dim 0 of ``n``, or of each sample's windows one after another) and the
result's shape is recorded with that tensor and the
result's gradient; any other use marks the parameter as not elementwise. Each sample's gradient is then
``Σ δ_i·x_i`` (``δ_i`` for an add) over the dims the parameter was broadcast along. The hooks engine checks
the result against the loop once, as it checks module-local gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_Tensor = torch.Tensor
_VIEWS = {_Tensor.reshape, torch.reshape, _Tensor.view, _Tensor.unsqueeze, torch.unsqueeze, _Tensor.flatten,
          torch.flatten, _Tensor.__getitem__}
_MUL = {torch.mul, _Tensor.mul, _Tensor.__mul__, _Tensor.__rmul__}
_ADD = {torch.add, _Tensor.add, _Tensor.__add__, _Tensor.__radd__}


@dataclass
class _Use:
    mul: bool  # x * b (else x + b)
    x: torch.Tensor | None  # the batched operand (for a mul)
    version: int
    b: torch.Size  # the shape of the parameter's view in the op
    shape: torch.Size  # the result's shape
    grad: torch.Tensor | None = None

    def per_sample(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``(n, *b)``: each sample's gradient of the view. Dim 0 of the result holds ``n`` samples, or each
        sample's rows one after another (windows): summed per sample."""
        g = self.grad.to(dtype) * self.x.to(dtype) if self.mul else self.grad.to(dtype)
        if self.shape[0] != n:
            g = g.reshape(n, self.shape[0] // n, *self.shape[1:]).sum(1)
        full = (1,) * (len(self.shape) - len(self.b)) + tuple(self.b)  # the view as it broadcast
        summed = [d for d in range(1, len(self.shape)) if full[d] == 1 and self.shape[d] != 1]
        return (g.sum(summed, keepdim=True) if summed else g).reshape(n, *self.b)


def _plain_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


class ElementwiseUses(TorchFunctionMode):
    """Records the elementwise uses of ``watched`` (parameter name -> tensor) in a forward of ``n`` samples."""

    def __init__(self, watched: dict[str, torch.Tensor], n: int):
        super().__init__()
        self.n = n
        self.ids = {id(p): name for name, p in watched.items()}
        self.views: dict[int, tuple[str, torch.Tensor]] = {}  # the views are kept alive: their ids stay theirs
        self.uses: dict[str, list[_Use]] = {name: [] for name in watched}
        self.bad: set[str] = set()

    def _origin(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.ids:
            return self.ids[id(t)]
        view = self.views.get(id(t))
        return view[0] if view is not None and view[1] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():  # a check's forward (the loss form on one sample): no graph to read
            return out
        hits = [name for name in map(self._origin, pytree.tree_leaves((args, kwargs))) if name]
        if not hits or not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out)):
            return out  # nothing watched, or a query (dim(), shape, is_floating_point()) that makes no tensor
        name = hits[0]
        first = self._origin(args[0]) if args else None
        if (func in _VIEWS and len(hits) == 1 and first and isinstance(out, torch.Tensor)
                and (func is not _Tensor.__getitem__ or _plain_index(args[1]))):
            self.views[id(out)] = (name, out)
        elif (func in _MUL or func in _ADD) and len(args) == 2 and not kwargs and len(hits) == 1:
            b, x = (args[0], args[1]) if first else (args[1], args[0])
            if self._batched(x, b, out):
                use = _Use(func in _MUL, x.detach() if func in _MUL else None, x._version, b.shape, out.shape)
                self.uses[name].append(use)
                out.register_hook(lambda g, use=use: setattr(use, "grad", g))
            else:
                self.bad.add(name)
        else:
            self.bad.update(hits)
        return out

    def _batched(self, x: Any, b: torch.Tensor, out: Any) -> bool:
        """``x`` holds the batch (or each sample's windows) and the result's shape; ``b`` broadcasts into it
        without a batch dimension."""
        return (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and out.requires_grad
                and out.dim() >= 1 and x.shape == out.shape and out.shape[0] % self.n == 0
                and (b.dim() < out.dim() or b.shape[0] == 1))

    def grads(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: (n, *shape)}`` for every watched parameter used, and only used, elementwise, reached by the
        backward, with inputs not written in place since; the others are added to :attr:`bad`."""
        out = {}
        for name, uses in self.uses.items():
            if not uses:  # not used so in this forward: not watched again (the watch costs every op a call)
                self.bad.add(name)
            if name in self.bad:
                continue
            p, total = params[name], None
            for use in uses:
                if use.grad is None or (use.x is not None and use.x._version != use.version):
                    self.bad.add(name)
                    break
                g = use.per_sample(self.n, torch.promote_types(p.dtype, torch.float32))
                total = g.reshape(self.n, *p.shape) if total is None else total + g.reshape(self.n, *p.shape)
            if name not in self.bad:
                out[name] = total
        return out
