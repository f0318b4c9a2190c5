"""Applying masks to training so that nothing outside the selection moves.

Three mechanisms, each for what the others cannot do:

- a tensor with no selected element stops requiring grad: autograd skips its weight gradient and
  torch optimizers skip it (no gradient, so no momentum, Adam moments or weight decay);
- a partly selected tensor gets a post-accumulate-grad hook that zeroes the gradient of its masked
  entries (so gradient clipping and the optimizer see only the selection);
- an optimizer guard (step hooks) writes the masked entries' values back after each step, because
  decoupled weight decay (AdamW) and momentum or moments accumulated before the selection move
  entries whose gradient is zero. Values are restored bit for bit from a copy taken when applied.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import GradselError

__all__ = ["MaskHandle", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    opt = optimizer
    while not type(opt).__module__.startswith("torch.optim") and isinstance(
            getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise GradselError(f"optimizer of type {type(optimizer).__name__} is not a torch.optim.Optimizer "
                           "(nor wraps one in .optimizer)")
    return opt


class _Guard:
    """Masked state of one parameter: hook, frozen values, requires_grad before."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor):
        self.param = param
        self.mask = mask
        self.requires_grad = param.requires_grad
        self.hook = None
        self.frozen_values = None
        self.set(mask)

    def set(self, mask: torch.Tensor) -> None:
        """(Re)apply ``mask``; entries newly masked keep the value they have now."""
        p = self.param
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.mask = mask
        self.frozen_values = None
        self.frozen = not bool(mask.any())
        if bool(mask.all()):
            p.requires_grad_(self.requires_grad)
        elif self.frozen:
            p.requires_grad_(False)
            p.grad = None
        else:
            p.requires_grad_(self.requires_grad)
            self.masked = ~mask
            self.frozen_values = p.detach()[self.masked].clone()
            masked = self.masked
            if p.grad is not None:
                p.grad.masked_fill_(masked, 0)

            def zero_masked(q: torch.Tensor) -> None:  # fill, not multiply: a NaN stays out of the masked part
                q.grad.masked_fill_(masked, 0)

            self.hook = p.register_post_accumulate_grad_hook(zero_masked)

    def restore(self) -> None:
        if self.frozen_values is not None:
            with torch.no_grad():
                self.param.masked_scatter_(self.masked, self.frozen_values)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.param.requires_grad_(self.requires_grad)


class MaskHandle:
    """What ``Selection.apply`` returns: a context manager with ``step()``, ``remove()`` and state.

    ``step()`` is called once per training step; it does nothing for static policies and drives the
    progressive ones. ``remove()`` restores plain training (hooks off, ``requires_grad`` as before).
    """

    def __init__(self, selection, model: nn.Module, optimizer: Any = None):
        selection.check(model)
        self.selection = selection
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        params = dict(model.named_parameters())
        self.guards: dict[str, _Guard] = {}
        for name, mask in selection.masks.items():
            self.guards[name] = _Guard(params[name], mask.to(params[name].device))
        self._opt_hooks = []
        if self.optimizer is not None:
            self._opt_hooks = [self.optimizer.register_step_pre_hook(self._before_step),
                               self.optimizer.register_step_post_hook(self._after_step)]
        elif any(g.frozen_values is not None for g in self.guards.values()):
            warnings.warn("Selection.apply without an optimizer masks gradients only: weight decay and momentum "
                          "can still move masked entries. Pass the optimizer: selection.apply(model, optimizer).",
                          stacklevel=3)
        self.controller = selection.policy_object().controller(selection, model, self)
        self.steps = 0
        self.removed = False

    # -- optimizer guard ---------------------------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        for g in self.guards.values():
            if g.frozen:
                g.param.grad = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        for g in self.guards.values():
            g.restore()

    # -- masks that change (progressive policies) -----------------------------------------------------------
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks of some parameters; entries that become masked keep their current values
        and whole tensors that become masked lose their optimizer state (the memory is released)."""
        for name, mask in masks.items():
            g = self.guards[name]
            mask = mask.to(g.param.device)
            g.set(mask)
            self.selection.masks[name] = mask.cpu()
            if g.frozen and self.optimizer is not None:
                self.optimizer.state.pop(g.param, None)

    def step(self) -> None:
        """Call once per training step (after ``optimizer.step()``)."""
        if self.removed:
            raise GradselError("this selection handle was removed; apply the selection again")
        self.steps += 1
        if self.controller is not None:
            self.controller.step()

    def remove(self) -> None:
        """Undo everything ``apply`` did to the model and optimizer."""
        for g in self.guards.values():
            g.remove()
        for h in self._opt_hooks:
            h.remove()
        self._opt_hooks = []
        if self.controller is not None and hasattr(self.controller, "close"):
            self.controller.close()
        self.removed = True

    def state_dict(self) -> dict:
        """Step count and the progressive policy's state (for checkpoints)."""
        state = {"steps": self.steps}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
            state["masks"] = {n: m.clone() for n, m in self.selection.masks.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if self.controller is not None:
            self.update({n: m for n, m in state["masks"].items()})
            self.controller.load_state_dict(state["controller"])

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
