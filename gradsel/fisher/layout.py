"""A guard around torch's CPU batch-norm backward on a batch of one (torch 2.14.1).

``aten.native_batch_norm_backward`` on the CPU reads the output gradient wrongly when that gradient is laid
out channels-last while the layer's input is not: tens of times the gradient's size off, silently, in
BatchNorm (train and eval mode) and InstanceNorm. With two samples or more autograd hands it a gradient laid
out like the input, so ordinary training does not meet it; on a batch of one, a size-1 dimension leaves the
strides free, and some backwards (timm's EfficientFormer: a stride of 448 on the batch dimension) hand over
exactly that gradient. The batch-of-one loop, gradsel's reference, gave a Fisher 97% off on EfficientFormer's
biases before this guard.

:func:`norm_gradients_as_inputs` gives each BatchNorm / InstanceNorm module, for the block, a forward hook whose
tensor hook on the output copies its gradient into the input's layout (InstanceNorm: the contiguous layout it
normalises in) before the norm's backward reads it; a gradient laid out right already passes through
untouched. ``F.batch_norm`` called outside a module is not covered.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["norm_gradients_as_inputs"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _as_input(x: torch.Tensor):
    def hook(g: torch.Tensor) -> torch.Tensor:
        return g if g.stride() == x.stride() else torch.empty_like(x).copy_(g)
    return hook


def _contiguous(g: torch.Tensor) -> torch.Tensor:
    return g.contiguous()


def _forward_hook(module: nn.Module, inputs: tuple, out) -> None:
    x = inputs[0] if inputs else None
    if isinstance(out, torch.Tensor) and out.requires_grad and isinstance(x, torch.Tensor) and x.dim() > 2:
        out.register_hook(_contiguous if isinstance(module, nn.modules.instancenorm._InstanceNorm) else _as_input(x))


@contextlib.contextmanager
def norm_gradients_as_inputs(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block, forwards of ``model`` give its BatchNorm and InstanceNorm modules gradients laid out
    as their inputs (nothing to do for a model without them, or with ``active=False``)."""
    handles = [m.register_forward_hook(_forward_hook) for m in model.modules() if active and isinstance(m, _NORMS)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
