"""Applying masks to training so that nothing outside the selection moves, without copying the weights.

What ``Selection.apply(model, optimizer)`` does to each masked parameter:

- nothing selected: ``requires_grad_(False)``; autograd skips its weight gradient and torch optimizers,
  seeing no gradient, skip it (no momentum, moments or weight decay).
- partly selected: the selected entries are kept compactly (int32 flat indices when under 1/32 of the
  tensor is selected, else a bit-packed mask; a bool mask is expanded only for a moment, one tensor at a
  time), and a post-accumulate-grad hook keeps only the selected gradient entries (gathers them, zeroes
  the gradient, scatters them back, so a NaN or Inf in a masked entry never leaks). Clipping and the
  optimizer see only the selection.

A zero gradient alone does not keep an entry still: momentum or moments from before the selection, and
weight decay, move it. For ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exactly those classes) the guard
knows the math and needs no copy of any value:

- the masked entries of the state that moves a parameter with zero gradient (SGD ``momentum_buffer``,
  Adam ``exp_avg``) are zeroed once: at ``apply``, after ``optimizer.load_state_dict`` and when masks
  change. With a zero gradient they then stay zero, and the update there is exactly 0 (``exp_avg_sq`` may
  stay: ``0 / (sqrt(v) + eps)`` is 0).
- weight decay: for each step, the step pre-hook sets the group's ``weight_decay`` to 0 and applies it with
  the optimizer's own float ops to the selected entries only (decoupled: ``p.mul_(1 - lr * wd)``; L2:
  ``grad.add(p, alpha=wd)``, masked again, given to the optimizer as the gradient). Selected entries are
  bit for bit what the plain optimizer computes. The post-hook gives ``weight_decay`` and the gradients
  back; after a step that raised, the next step, ``optimizer.state_dict()``, ``load_state_dict()`` or
  ``remove()`` does.

Any other optimizer (and a step with a closure, which computes the gradients after the pre-hook; fused,
capturable or differentiable groups; tensor weight decay; ``eps=0``; sparse gradients) gets a transient
copy instead: the pre-hook clones each partly selected parameter and
the post-hook writes its masked entries back, so one step's peak memory grows by those parameters' bytes.

Nothing is held between steps but the compact masks and the hooks, so a checkpoint loaded into the model
or the optimizer before or after ``apply`` resumes the run exactly.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from .errors import GradselError
from .params import unwrap_model

__all__ = ["MaskHandle", "unwrap_optimizer"]

#: optimizer classes whose update the guard knows (exactly these, not subclasses)
KNOWN_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
#: the state that moves an entry whose gradient is zero
_MOVING_STATE = ("momentum_buffer", "exp_avg")


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


class _Entries:
    """The selected entries of one tensor: flat indices (share < 1/32) or a bit-packed mask."""

    def __init__(self, mask: torch.Tensor):
        flat = mask.reshape(-1)
        self.numel = flat.numel()
        self.shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
        if 32 * int(flat.sum()) < self.numel:
            dtype = torch.int32 if self.numel < 2**31 else torch.int64
            self.index, self.bits = flat.nonzero().squeeze(1).to(dtype), None
        else:
            padded = nn.functional.pad(flat.to(torch.uint8), (0, -self.numel % 8)).view(-1, 8)
            self.index, self.bits = None, (padded << self.shifts).sum(1, dtype=torch.uint8)

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """A bool mask of ``shape`` (transient)."""
        bits = (self.bits.unsqueeze(1) >> self.shifts) & 1
        return bits.view(-1)[: self.numel].bool().view(shape)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            return t.take(self.index.long())
        return t.masked_select(self.dense(t.shape))

    def put(self, t: torch.Tensor, values: torch.Tensor) -> None:
        if self.index is not None:
            t.put_(self.index.long(), values)
        else:
            t.masked_scatter_(self.dense(t.shape), values)

    def keep(self, t: torch.Tensor) -> None:
        """Zero ``t`` outside the selection, in place (a fill: NaN and Inf there are gone too)."""
        if t.is_sparse:
            raise GradselError("Selection.apply masks dense gradients and got a sparse one (row_sparse(..., "
                               "compact=True), or an nn.Embedding(sparse=True)): train with selection.optimizer(model) "
                               "(SparseAdamW), which reads the selected entries of sparse row gradients")
        if self.index is not None:
            values = self.take(t)
            t.zero_()
            self.put(t, values)
        else:
            t.masked_fill_(self.dense(t.shape).logical_not_(), 0)

    def nbytes(self) -> int:
        t = self.index if self.index is not None else self.bits
        return t.numel() * t.element_size() + self.shifts.numel()


class _Guard:
    """One masked parameter: frozen whole, or partly selected (compact entries + gradient hook)."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor):
        self.param = param
        self.requires_grad = param.requires_grad
        self.hook = None
        self.set(mask)

    def set(self, mask: torch.Tensor) -> None:
        """(Re)apply ``mask``; entries newly masked keep the value they have now."""
        p = self.param
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.frozen, self.entries = self._decide(mask)
        p.requires_grad_(self.requires_grad and not self.frozen)
        if self.frozen:
            p.grad = None
        elif self.entries is not None:
            entries = self.entries
            if p.grad is not None:
                entries.keep(p.grad)
            self.hook = p.register_post_accumulate_grad_hook(lambda q: entries.keep(q.grad))

    def _decide(self, mask: torch.Tensor) -> tuple[bool, "_Entries | None"]:
        """``(frozen whole, selected entries or None when all are)`` (:mod:`gradsel.fsdp` decides across ranks)."""
        frozen = not bool(mask.any())
        return frozen, None if frozen or bool(mask.all()) else _Entries(mask)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.param.requires_grad_(self.requires_grad)


def _known_math(optimizer: torch.optim.Optimizer) -> bool:
    """True when the guard can protect masked entries of this optimizer's step without a copy."""
    if type(optimizer) not in KNOWN_OPTIMIZERS:
        return False
    for group in optimizer.param_groups:
        if (group.get("fused") or group.get("capturable") or group.get("differentiable")
                or isinstance(group.get("weight_decay"), torch.Tensor)
                or ("eps" in group and not group["eps"] > 0)):
            return False
        if any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
            return False
    return True


def _to_scalar(lr: Any) -> Any:
    """``lr`` as torch's optimizers read it (a 1-element tensor becomes 0-dim)."""
    return lr.squeeze() if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


def _uses_foreach(group: dict, params: list[torch.Tensor]) -> bool:
    if group.get("foreach") is not None:
        return bool(group["foreach"])
    if isinstance(group.get("lr"), torch.Tensor):
        return False
    from torch.optim.optimizer import _default_to_fused_or_foreach

    return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]


class MaskHandle:
    """What ``Selection.apply`` returns: a context manager with ``step()``, ``remove()`` and state.

    ``step()`` is called once per training step; it does nothing for static policies and drives the
    progressive ones. ``remove()`` restores plain training (hooks off, ``requires_grad`` as before).
    """

    def __init__(self, selection, model: nn.Module, optimizer: Any = None):
        model = unwrap_model(model)
        selection.check(model)
        self.selection = selection
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        params = dict(model.named_parameters())
        self.guards: dict[str, _Guard] = {}
        for name, mask in selection.masks.items():
            self.guards[name] = self._guard(name, params[name], mask)
        self._undo: list[Callable[[], None]] = []
        self._opt_hooks = []
        if self.optimizer is not None:
            opt = self.optimizer
            self._opt_hooks = [opt.register_step_pre_hook(self._before_step),
                               opt.register_step_post_hook(lambda *_: self._finish()),
                               opt.register_state_dict_pre_hook(lambda *_: self._finish()),
                               opt.register_load_state_dict_pre_hook(lambda *_: self._finish()),
                               opt.register_load_state_dict_post_hook(lambda *_: self._zero_moving_state())]
            self._zero_moving_state()
        elif any(g.entries is not None for g in self.guards.values()):
            warnings.warn("Selection.apply without an optimizer masks gradients only: weight decay and momentum "
                          "can still move masked entries. Pass the optimizer: selection.apply(model, optimizer).",
                          stacklevel=3)
        self.controller = selection.policy_object().controller(selection, model, self)
        self.steps = 0
        self.removed = False

    def _guard(self, name: str, param: nn.Parameter, mask: torch.Tensor) -> "_Guard":
        """The guard of one masked parameter (:mod:`gradsel.fsdp` guards FSDP2's local shards)."""
        return _Guard(param, mask.to(param.device))

    # -- optimizer guard ---------------------------------------------------------------------------------
    def _partial(self) -> dict[nn.Parameter, _Entries]:
        return {g.param: g.entries for g in self.guards.values() if g.entries is not None}

    def _zero_moving_state(self, guards=None) -> None:
        """Zero the masked entries of the state that would move a parameter whose gradient is zero."""
        if self.optimizer is None or type(self.optimizer) not in KNOWN_OPTIMIZERS:
            return
        with torch.no_grad():
            for g in guards if guards is not None else self.guards.values():
                state = self.optimizer.state.get(g.param, {}) if g.entries is not None else {}
                for key in _MOVING_STATE:
                    if isinstance(state.get(key), torch.Tensor) and state[key].shape == g.param.shape:
                        g.entries.keep(state[key])

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._finish()  # a step that raised left its undo behind
        for g in self.guards.values():
            if g.frozen:
                g.param.grad = None
        partial = self._partial()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        with torch.no_grad():
            if closure is None and _known_math(optimizer):
                for group in optimizer.param_groups:
                    self._decay_selected(group, partial)
            else:
                for p, entries in partial.items():
                    saved = p.detach().clone()
                    self._undo.append(lambda p=p, e=entries, saved=saved: self._write_masked(p, e, saved))
        self._scale_updates()

    def _scale_updates(self) -> None:
        """Progressive policies that anneal (jsdrift ``anneal=``): keep the entries' values before the step, so
        that the post-step hook can scale the update the optimizer made, ``p = before + factor * (p - before)``:
        for SGD and Adam(W) that is the step with the learning rate times ``factor``, decay included."""
        scales = getattr(self.controller, "update_scales", None)
        for name, rows, factor in scales() if scales is not None else ():
            p = self.guards[name].param.detach()
            view = p if rows is None else p[rows[0]:rows[1]]
            before = view.clone()
            self._undo.append(lambda view=view, before=before, w=1.0 - factor: view.lerp_(before, w))

    def _decay_selected(self, group: dict, partial: dict) -> None:
        """Take the group's weight decay over for this step, applying it to selected entries only."""
        wd = group.get("weight_decay", 0)
        params = [p for p in group["params"] if p.grad is not None]
        if not wd or not any(p in partial for p in params):
            return
        group["weight_decay"] = 0.0
        self._undo.append(lambda: group.__setitem__("weight_decay", wd))
        if group.get("decoupled_weight_decay", False):  # Adam(W): param.mul_(1 - lr * weight_decay)
            factor = 1 - _to_scalar(group["lr"]) * wd
            for p in params:
                if p in partial:
                    partial[p].put(p, partial[p].take(p).mul_(factor))
                else:
                    p.mul_(factor)
            return
        grads = [p.grad for p in params]  # SGD, Adam: grad = grad.add(param, alpha=weight_decay)
        alpha = -wd if group.get("maximize", False) else wd  # the optimizer negates the sum under maximize
        if _uses_foreach(group, params):
            decayed = torch._foreach_add(grads, params, alpha=alpha)
        else:
            decayed = [g.add(p, alpha=alpha) for g, p in zip(grads, params)]
        for p, d in zip(params, decayed):
            if p in partial:
                partial[p].keep(d)
            p.grad = d

        def give_back_grads():
            for p, g in zip(params, grads):
                p.grad = g

        self._undo.append(give_back_grads)

    @staticmethod
    def _write_masked(p: torch.Tensor, entries: _Entries, saved: torch.Tensor) -> None:
        with torch.no_grad():
            selected = entries.take(p)
            p.copy_(saved)
            entries.put(p, selected)

    def _finish(self) -> None:
        """Undo what the last step pre-hook changed (weight decay, gradients, the transient copies)."""
        while self._undo:
            self._undo.pop()()

    # -- masks that change (progressive policies) -----------------------------------------------------------
    def update(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks of some parameters; entries that become masked keep their current values
        and whole tensors that become masked lose their optimizer state (the memory is released)."""
        changed = []
        for name, mask in masks.items():
            g = self.guards[name]
            g.set(mask.to(g.param.device))
            self.selection.masks[name] = mask.cpu()
            changed.append(g)
            if g.frozen and self.optimizer is not None:
                self.optimizer.state.pop(g.param, None)
        self._zero_moving_state(changed)

    @property
    def done(self) -> bool:
        """True when a progressive policy has nothing left to train (always False for static policies)."""
        return bool(getattr(self.controller, "done", False))

    @property
    def trainable_share(self) -> float:
        """The share of the masked parameters' elements still trained (the controller's own figure for
        progressive policies that keep one)."""
        share = getattr(self.controller, "trainable_share", None)
        if callable(share):
            return float(share())
        masks = self.selection.masks
        return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))

    def step(self) -> Any:
        """Call once per training step (after ``optimizer.step()``). Returns what a progressive policy's
        controller returns (jsdrift: the freeze event of this step, or None); None for static policies."""
        if self.removed:
            raise GradselError("this selection handle was removed; apply the selection again")
        self._finish()
        self.steps += 1
        if self.controller is not None:
            return self.controller.step()
        return None

    def remove(self) -> None:
        """Undo everything ``apply`` did to the model and optimizer."""
        self._finish()
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
