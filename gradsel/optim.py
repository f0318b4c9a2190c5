"""Optimizer state only for the selected elements: :class:`SparseAdamW` and :func:`sparse_adamw`.

A dense optimizer under ``Selection.apply`` keeps two moments for every element of every tensor that has
one selected element, and a guard writes the masked entries back after each step. ``SparseAdamW`` keeps,
for a partly selected tensor, the flat indices of its selected elements (int32 when the tensor has fewer
than 2**31 elements) and moments of that length only; it reads the gradient at those indices, updates
them, and writes them back with ``scatter_``. Every other element is never written, so it stays bit for
bit what it was, by construction. Fully selected tensors (``always=`` heads) keep dense moments; tensors
with no selected element are not in the optimizer at all.

The arithmetic is ``torch.optim.AdamW``'s (decoupled decay ``p *= 1 - lr * wd``, bias corrections, ``eps``
added after the square root), applied to the gathered values: on the CPU its fused kernel itself, elsewhere
its single-tensor update operation for operation. The trajectory equals dense AdamW with the selection
applied. Sparse gradients of whole rows are read too: those of ``row_sparse(..., compact=True)`` and those of
``nn.Embedding(sparse=True)``, whose selected rows that a batch did not look up have a zero gradient (AdamW
still moves them by momentum and decay, as it would with a dense embedding).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .errors import GradselError
from .params import ParamSpec, resolve, unwrap_model
from .rowsparse import COMPACT_WEIGHTS

__all__ = ["SparseAdamW", "sparse_adamw", "state_bytes"]

_INDEX_KEY = "gradsel_index"


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 parameter's (or gradient's) local shard, the DTensor's local tensor; any other tensor as is."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def _flat_index(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the True entries (int32 below 2**31 elements), None when all are True.

    For a DTensor parameter (FSDP2) the mask is its local shard's; a shard holding no selected element gets
    an empty index (another rank holds the tensor's selected elements)."""
    shard = _local(param)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shard.shape):
        raise GradselError(f"a mask must be a tensor of the parameter's shape {tuple(shard.shape)}, got "
                           f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
    mask = mask.to(torch.bool)
    if bool(mask.all()):
        return None
    if shard is not param and not bool(mask.any()):
        return torch.zeros(0, dtype=torch.int32, device=shard.device)
    param = shard
    if not bool(mask.any()):
        raise GradselError(f"a parameter of shape {tuple(param.shape)} has no selected element: leave it out of "
                           "the optimizer (gradsel.optim.sparse_adamw does) instead of passing an all-False mask")
    dtype = torch.int32 if param.numel() < 2**31 else torch.int64
    return mask.reshape(-1).nonzero().squeeze(1).to(dtype=dtype, device=param.device)


#: elements per piece of the element-wise update: the square-root temporary of a large tensor (a 30k x 384
#: embedding: 45 MiB, and torch's ``sqrt() / c`` makes two) stays at 4 MiB
CHUNK = 1 << 20


def _chunks(tensors: list[torch.Tensor]):
    """The same-shaped ``tensors`` as aligned flat pieces of at most :data:`CHUNK` elements (whole when small or
    when one of them is not contiguous)."""
    n = tensors[0].numel()
    if n <= CHUNK or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flats = [t.view(-1) for t in tensors]
    for start in range(0, n, CHUNK):
        yield [f[start:start + CHUNK] for f in flats]


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of its storage without gaps or overlaps, in some order of its dims
    (contiguous, channels_last, any permutation)."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in storage order (its logical order when contiguous)."""
    if t.is_contiguous():
        return t.view(-1)
    if not _dense(t):
        raise GradselError(f"SparseAdamW needs parameters and gradients without gaps in memory (got strides "
                           f"{t.stride()} for shape {tuple(t.shape)}); call model.to(memory_format="
                           "torch.contiguous_format)")
    return t.as_strided((t.numel(),), (1,))


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that keeps moments only for the selected elements of each parameter.

    Args:
        params: tensors (trained in full), ``(tensor, mask)`` pairs (mask: bool tensor of the tensor's shape,
            True = trained; None = all), or param-group dicts with ``"params"`` and an optional ``"masks"``
            list aligned with it.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        compact_grads: gather each partly selected tensor's gradient into a buffer of the selected length
            as soon as backward has accumulated it, and free the dense gradient (at most one dense weight
            gradient alive at a time). ``p.grad`` is then None for those tensors: clip with
            :meth:`clip_grad_norm_`, not ``torch.nn.utils.clip_grad_norm_``; do not combine with
            ``Selection.apply`` (its gradient hook expects ``p.grad``).
        progressive: the selection may shrink during training (a progressive policy such as ``jsdrift``,
            through :meth:`set_mask`); :meth:`load_state_dict` then accepts state saved after some of the
            elements were frozen, and shrinks to them.
        fused: update CPU tensors with torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``'s
            arithmetic, one pass over each tensor; 2.5x faster than the per-tensor update on MiniLM's 22.7M
            parameters, one thread). ``False``, and any tensor off the CPU: the single-tensor arithmetic
            (``foreach=False``), in 1M-element pieces so that temporaries stay small.

    Elements outside the masks are never read (their gradient may hold anything) and never written.

    >>> import torch, torch.nn as nn
    >>> lin = nn.Linear(4, 3)
    >>> mask = torch.zeros(3, 4, dtype=torch.bool); mask[0, :2] = True
    >>> opt = SparseAdamW([(lin.weight, mask), (lin.bias, None)], lr=0.1, weight_decay=0.1)
    >>> before = lin.weight.detach().clone()
    >>> lin(torch.randn(5, 4)).sum().backward(); opt.step()
    >>> bool(torch.equal(lin.weight[~mask], before[~mask])), bool((lin.weight[mask] != before[mask]).all())
    (True, True)
    >>> opt.state[lin.weight]["exp_avg"].shape
    torch.Size([2])
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 compact_grads: bool = False, progressive: bool = False, fused: bool = True):
        if not 0.0 <= float(lr):
            raise GradselError(f"lr={lr} must be >= 0")
        if not 0.0 <= eps:
            raise GradselError(f"eps={eps} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise GradselError(f"betas={betas} must each be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise GradselError(f"weight_decay={weight_decay} must be >= 0")
        self._index: dict[torch.Tensor, torch.Tensor | None] = {}
        self._cgrad: dict[torch.Tensor, torch.Tensor] = {}
        # sparse row gradients: their rows, where each selected entry is among their values, and which are absent
        self._row_pos: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        # (param, a layout of it) -> (its selected indices, where they are in that layout's storage order)
        self._places: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []
        self.compact_grads = compact_grads
        self.progressive = progressive
        self.fused = bool(fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(self._as_groups(params), defaults)

    @staticmethod
    def _as_groups(params: Iterable[Any]) -> list[dict]:
        items = list(params)
        if not items:
            raise GradselError("SparseAdamW got no parameters")
        if all(isinstance(i, dict) for i in items):
            return items
        group: dict = {"params": [], "masks": []}
        for item in items:
            if isinstance(item, torch.Tensor):
                group["params"].append(item)
                group["masks"].append(None)
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
                group["params"].append(item[0])
                group["masks"].append(item[1])
            else:
                raise GradselError("SparseAdamW takes tensors, (tensor, mask) pairs or param-group dicts; got "
                                   f"{type(item).__name__}")
        return [group]

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        masks = group.pop("masks", None)
        masks = [None] * len(params) if masks is None else list(masks)
        if len(masks) != len(params):
            raise GradselError(f"a param group has {len(params)} params but {len(masks)} masks")
        group["params"] = params
        super().add_param_group(group)  # checks leaves and duplicates
        for p, m in zip(params, masks):
            idx = None if m is None else _flat_index(m, p)
            if idx is not None:
                _flat(_local(p))
            self._index[p] = idx
            if idx is not None and self.compact_grads:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._gather_grad))

    # -- gradients ---------------------------------------------------------------------------------------
    def _gather_grad(self, p: torch.Tensor) -> None:
        sel = self._selected(p, _local(p.grad))
        buf = self._cgrad.get(p)
        self._cgrad[p] = sel if buf is None else buf.add_(sel)
        p.grad = None

    def _idx(self, p: torch.Tensor) -> torch.Tensor | None:
        """The selected flat indices of ``p`` on ``p``'s device (moved once, e.g. after ``model.to(device)``)."""
        idx = self._index[p]
        if idx is not None and idx.device != p.device:
            idx = self._index[p] = idx.to(p.device)
        return idx

    def _at(self, p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` (``p``'s local shard or a gradient of it) as a flat storage-order view, and where the selected
        elements are in it: the selected flat indices themselves when ``t`` is contiguous; for a channels_last
        (or otherwise permuted) tensor, those indices moved through its strides (cached per layout)."""
        idx = self._idx(p)
        if t.is_contiguous():
            return t.view(-1), idx
        key = (id(p), tuple(t.stride()), t.device)
        cached = self._places.get(key)
        flat = _flat(t)  # refuses layouts with gaps
        if cached is None or cached[0] is not idx:  # first use, or set_mask changed the selection
            # the storage offset of each logical element, picked at the selected ones
            offsets = torch.arange(t.numel(), device=t.device).as_strided(t.shape, t.stride()).reshape(-1)
            cached = self._places[key] = (idx, offsets[idx.long()])
        return flat, cached[1]

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient of the selected elements (gathered), or the dense gradient; None when there is none."""
        idx = self._idx(p)
        if idx is None:
            return _local(p.grad)
        if self.compact_grads and p in self._cgrad:
            return self._cgrad[p]
        if p.grad is None:
            return None
        return self._selected(p, _local(p.grad))

    def _selected(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The selected entries of ``grad``, a dense gradient of ``p`` or a row-sparse one (a sparse COO tensor
        of whole rows, as ``gradsel.rowsparse.row_sparse(..., compact=True)`` makes)."""
        idx = self._idx(p)
        if not grad.is_sparse:
            flat, pos = self._at(p, grad)
            return flat.index_select(0, pos)
        if grad.sparse_dim() != 1:
            raise GradselError(f"SparseAdamW reads sparse gradients of whole rows (sparse_dim 1); this one of shape "
                               f"{tuple(grad.shape)} has sparse_dim {grad.sparse_dim()}")
        rows, values = grad._indices()[0], grad._values()
        if not grad.is_coalesced() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()  # accumulated over backwards: rows repeat (sorted, distinct rows need no copy)
            rows, values = grad.indices()[0], grad.values()
        cached = self._row_pos.get(p)
        if cached is None or cached[0].device != rows.device or not torch.equal(cached[0], rows):
            width = values[0].numel() if rows.numel() else 1
            table = torch.full((grad.shape[0],), -1, dtype=torch.long, device=rows.device)
            table[rows] = torch.arange(rows.numel(), device=rows.device)
            pos = table[idx.long() // width]
            absent = pos < 0
            if not bool(absent.any()):
                absent = None
            elif p in COMPACT_WEIGHTS:  # row_sparse(compact=True) gives every touched row
                raise GradselError(f"a row-sparse gradient of shape {tuple(grad.shape)} lacks rows with selected "
                                   "elements: row_sparse and the optimizer were given different selections")
            # else rows that a sparse gradient leaves out are zero (nn.Embedding(sparse=True): the rows this
            # batch did not look up), as in the dense gradient
            cached = self._row_pos[p] = (rows.clone(), (pos.clamp(min=0) * width + idx.long() % width), absent)
        if not rows.numel():
            return values.new_zeros(idx.numel())
        picked = values.reshape(-1).index_select(0, cached[1])
        return picked if cached[2] is None else picked.masked_fill_(cached[2], 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if set_to_none:
            self._cgrad.clear()
        else:
            for buf in self._cgrad.values():
                buf.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the selected gradient entries to ``max_norm`` in total; return the norm before clipping.

        The norm is taken over the entries the optimizer trains only, which is what
        ``torch.nn.utils.clip_grad_norm_`` gives under ``Selection.apply`` (masked gradients zeroed). On FSDP2
        local shards (DTensor parameters) it is the norm over every rank's selected entries (one all-reduce of
        this rank's sum of powers, or of its maximum for ``inf``, over the shard group), so every rank clips by
        the same factor as one process would; every rank must call it.
        """
        group = self._shard_group()
        grads = [g for pg in self.param_groups for p in pg["params"] if (g := self._grad(p)) is not None]
        if not grads and group is None:
            return torch.tensor(0.0)
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        if group is None:
            total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        else:
            import torch.distributed as dist

            inf = norm_type == float("inf")
            device = norms[0].device if norms else _local(self.param_groups[0]["params"][0]).device
            # a norm is >= 0: with no local gradient, 0 adds nothing to the sum and nothing to the maximum
            stacked = torch.stack([n.double() for n in norms] + [torch.zeros((), dtype=torch.float64, device=device)])
            part = (stacked.max() if inf else stacked.pow(norm_type).sum()).reshape(1)
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
            total = (part[0] if inf else part[0].pow(1.0 / norm_type)).to(norms[0].dtype if norms else torch.float32)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for group in self.param_groups:
            for p in group["params"]:
                if self._index[p] is not None and self.compact_grads and p in self._cgrad:
                    self._cgrad[p].mul_(coef)
                elif p.grad is not None:
                    _local(p.grad).mul_(coef.to(_local(p.grad).device))  # outside the selection: never read
        return total

    def _shard_group(self) -> Any:
        """The process group FSDP2 shards this optimizer's DTensor parameters over; None for plain tensors."""
        meshes = [m for pg in self.param_groups for p in pg["params"] if (m := getattr(p, "device_mesh", None))]
        if not meshes:
            return None
        plain = sum(getattr(p, "device_mesh", None) is None for pg in self.param_groups for p in pg["params"])
        ranks = {(m.ndim, tuple(m.mesh.reshape(-1).tolist())) for m in meshes}  # each fully_shard call has its own
        if plain or len(ranks) != 1 or meshes[0].ndim != 1:
            raise GradselError("clip_grad_norm_ on FSDP2 needs every parameter of the optimizer sharded by fully_shard "
                               "over the same ranks on a 1-D device mesh (a replicated plain tensor would be counted "
                               f"once per rank); this optimizer mixes {plain} plain tensor(s) and meshes {sorted(ranks)}")
        return meshes[0].get_group()

    # -- the step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the selected elements (same arithmetic as ``torch.optim.AdamW``: its fused kernel
        for CPU tensors, unless ``fused=False``; its single-tensor arithmetic otherwise)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            wd, eps, amsgrad, maximize = group["weight_decay"], group["eps"], group["amsgrad"], group["maximize"]
            fused: dict[torch.dtype, tuple[list, ...]] = {}  # dtype -> targets, grads, moments, maxima, steps
            scatter = []  # (p, gathered target) written back after the fused update
            for p in group["params"]:
                grad = self._grad(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise GradselError("SparseAdamW takes sparse gradients (row_sparse(..., compact=True)) for "
                                       "partly selected tensors only; this one is trained in full: leave it dense")
                idx = self._idx(p)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                if state["exp_avg"].shape != grad.shape:
                    raise GradselError(f"optimizer state of shape {tuple(state['exp_avg'].shape)} does not fit a "
                                       f"gradient of shape {tuple(grad.shape)}: the state was loaded from another "
                                       "selection")
                target = _local(p) if idx is None else self._read(p)
                if self._fusable(target, grad, state):
                    lists = fused.setdefault(target.dtype, ([], [], [], [], [], []))
                    for lst, t in zip(lists, (target, grad, state["exp_avg"], state["exp_avg_sq"],
                                              state.get("max_exp_avg_sq"), state["step"])):
                        if t is not None:
                            lst.append(t)
                    if idx is not None:
                        scatter.append((p, target))
                    continue
                state["step"] += 1
                _adamw_pieces(target, -grad if maximize else grad, state, state["step"].item(), lr, beta1, beta2,
                              wd, eps, amsgrad)
                if idx is not None:
                    self._write(p, target)
            for targets, grads, exp_avgs, exp_avg_sqs, maxima, steps in fused.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(targets, grads, exp_avgs, exp_avg_sqs, maxima, steps, amsgrad=amsgrad, lr=lr,
                                    beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, maximize=maximize,
                                    grad_scale=None, found_inf=None)
            for p, target in scatter:
                self._write(p, target)
        return loss

    def _read(self, p: torch.Tensor) -> torch.Tensor:
        flat, pos = self._at(p, _local(p))
        return flat.index_select(0, pos)

    def _write(self, p: torch.Tensor, values: torch.Tensor) -> None:
        flat, pos = self._at(p, _local(p))
        flat.scatter_(0, pos.long(), values)

    def _fusable(self, target: torch.Tensor, grad: torch.Tensor, state: dict) -> bool:
        """Whether torch's fused AdamW kernel takes this update: CPU floating-point tensors of one dtype (the
        step counter is a CPU tensor), unless the optimizer was built with ``fused=False``."""
        return (self.fused and target.device.type == "cpu" and target.is_floating_point()
                and grad.dtype == target.dtype == state["exp_avg"].dtype and state["step"].device.type == "cpu")

    # -- checkpoints -------------------------------------------------------------------------------------
    def _packed_ids(self) -> dict[torch.Tensor, int]:
        ids, i = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                ids[p] = i
                i += 1
        return ids

    def state_dict(self) -> dict:
        """``torch.optim`` state dict plus the selected indices of each partly selected parameter."""
        sd = super().state_dict()
        sd[_INDEX_KEY] = {i: self._index[p].clone() for p, i in self._packed_ids().items()
                          if self._index[p] is not None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`; it must come from an optimizer over the same selection."""
        if _INDEX_KEY not in state_dict:
            raise GradselError("this state dict has no selected indices: it was not saved by SparseAdamW "
                               "(a dense optimizer's state cannot be loaded into SparseAdamW)")
        saved = state_dict[_INDEX_KEY]
        shrink = {}
        for p, i in self._packed_ids().items():
            mine, theirs = self._index[p], saved.get(i)
            same = (mine is None and theirs is None) or (
                mine is not None and theirs is not None and mine.shape == theirs.shape
                and torch.equal(mine.cpu().long(), theirs.cpu().long()))
            if not same and self.progressive and theirs is not None and _is_subset(theirs, mine, p.numel()):
                shrink[p] = theirs
            elif not same:
                raise GradselError(f"the state dict was saved for a different selection: parameter #{i} (shape "
                                   f"{tuple(p.shape)}) has other selected elements; build the optimizer from "
                                   "the selection the checkpoint was trained with")
        for p, theirs in shrink.items():  # a progressive policy froze these elements before the save
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[theirs.cpu().long()] = True
            self.set_mask(p, mask.view(p.shape))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != _INDEX_KEY})

    # -- selections that shrink (progressive policies) -----------------------------------------------------
    def follow(self, masks: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
               seen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Shrink to the masks a progressive policy replaced since ``seen`` (an identity check per tensor, so
        cheap every step); returns the masks to pass as ``seen`` next time. Used by the Trainer and Lightning
        callbacks."""
        for name, mask in masks.items():
            p = params.get(name)
            if seen.get(name) is not mask and p is not None and p in self._index:
                self.set_mask(p, mask)
        return dict(masks)

    @torch.no_grad()
    def set_mask(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Train only ``mask``'s elements of ``param`` from now on (a subset of those trained so far).

        The moments of the elements that stay are kept, those of the others dropped; an all-False mask
        drops the parameter's state (it is then skipped). Call it between steps, not between backward
        and step.

        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(4))
        >>> opt = SparseAdamW([w], lr=0.1); w.grad = torch.ones(4); opt.step()
        >>> opt.set_mask(w, torch.tensor([True, False, True, False]))
        >>> w.grad = torch.ones(4); before = w.detach().clone(); opt.step()
        >>> (w != before).tolist(), opt.state[w]["exp_avg"].shape
        ([True, False, True, False], torch.Size([2]))
        """
        if param not in self._index:
            raise GradselError(f"a parameter of shape {tuple(param.shape)} is not in this optimizer")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(param.shape):
            raise GradselError(f"a mask must be a tensor of the parameter's shape {tuple(param.shape)}, got "
                               f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
        old = self._index[param]
        mask = mask.to(torch.bool)
        if bool(mask.all()):
            if old is None:
                return
            raise GradselError("set_mask can only shrink a selection: this mask selects elements the optimizer "
                               "does not train (build a new optimizer for a larger selection)")
        dtype = torch.int32 if param.numel() < 2**31 else torch.int64
        new = mask.reshape(-1).nonzero().squeeze(1).to(dtype=dtype, device=param.device)
        if old is not None and not _is_subset(new, old, param.numel()):
            raise GradselError("set_mask can only shrink a selection: this mask selects elements the optimizer "
                               "does not train (build a new optimizer for a larger selection)")
        if old is not None and old.shape == new.shape:
            return
        self._cgrad.pop(param, None)
        self._row_pos.pop(param, None)  # positions of the old selection in row-sparse gradients
        state = self.state.get(param)
        if state and new.numel() == 0:
            self.state.pop(param)
        elif state:
            pos = new.long() if old is None else torch.searchsorted(old.to(new.device).long(), new.long())
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key] = state[key].reshape(-1).index_select(0, pos.to(state[key].device))
        if old is None and self.compact_grads:
            self._hooks.append(param.register_post_accumulate_grad_hook(self._gather_grad))
        self._index[param] = new

    def remove_hooks(self) -> None:
        """Remove the ``compact_grads`` gradient hooks (the optimizer is unusable for training afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_bytes(self) -> int:
        """Bytes held for training state: moments, step counters and the selected indices."""
        return state_bytes(self)


def _adamw_pieces(target, grad, state, step, lr, beta1, beta2, wd, eps, amsgrad) -> None:
    """torch's single-tensor AdamW arithmetic, operation for operation, on :func:`_chunks` of the tensors."""
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / (1 - beta1**step)
    tensors = [target, grad, state["exp_avg"], state["exp_avg_sq"]] + ([state["max_exp_avg_sq"]] if amsgrad else [])
    for t, g, m, v, *vmax in _chunks(tensors):  # element-wise: the pieces change no bit of the result
        if wd != 0:
            t.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if vmax:
            torch.maximum(vmax[0], v, out=vmax[0])
        denom = (vmax[0] if vmax else v).sqrt().div_(bias_correction2_sqrt).add_(eps)
        t.addcdiv_(m, denom, value=-step_size)


def _is_subset(small: torch.Tensor, big: torch.Tensor | None, numel: int) -> bool:
    """Whether sorted flat indices ``small`` all occur in ``big`` (None: every index below ``numel``)."""
    small = small.cpu().long()
    if big is None:
        return bool(((small >= 0) & (small < numel)).all())
    big = big.cpu().long()
    if small.numel() > big.numel():
        return False
    if small.numel() == 0:
        return True
    pos = torch.searchsorted(big, small).clamp_(max=big.numel() - 1)
    return bool(torch.equal(big[pos], small))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state (and a :class:`SparseAdamW`'s indices).

    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(10))
    >>> opt = torch.optim.AdamW([w]); w.grad = torch.ones(10); opt.step()
    >>> state_bytes(opt)  # exp_avg + exp_avg_sq (2 x 40 bytes) + a float32 step counter
    84
    """
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    for idx in getattr(optimizer, "_index", {}).values():
        if idx is not None:
            total += idx.numel() * idx.element_size()
    return total


def sparse_adamw(selection, model: nn.Module, lr: float = 1e-3, *, freeze: bool = True,
                 no_decay: ParamSpec | None = None, **kwargs: Any) -> SparseAdamW:
    """A :class:`SparseAdamW` over ``model``'s selected elements.

    Partly selected tensors get compact state; fully selected ones (``always=``) dense state; tensors with
    no selected element, and parameters outside the selection, are left out.

    Args:
        selection: a :class:`gradsel.Selection` made for ``model``.
        model: the model to train.
        lr: learning rate.
        freeze: set ``requires_grad=False`` on every parameter the optimizer leaves out, so that backward
            skips their weight gradients. The names are kept in ``optimizer.frozen``.
        no_decay: parameters (names, globs, module classes, callable) trained without weight decay, in a
            second param group (e.g. ``["*.bias", "*LayerNorm*"]``).
        **kwargs: ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``, ``compact_grads``, ``fused``,
            ``progressive`` (default: whether the selection's policy is progressive).

    Returns:
        The optimizer; use it in place of ``Selection.apply`` (nothing outside the selection can move).

    >>> import torch, torch.nn as nn, gradsel
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sel = gradsel.select(model, None, "random", keep=5, always="2.*", progress=False)
    >>> opt = sparse_adamw(sel, model, lr=0.01)
    >>> opt.state_bytes() <= 5 * (4 + 4 + 4) + 18 * 8 + 3 * 4 + 5 * 4  # moments, steps, int32 indices
    True
    """
    model = unwrap_model(model)  # torch.compile / DDP wrappers: the selection's names are the inner model's
    selection.check(model)
    masks = {name: (None if bool(m.all()) else m) for name, m in selection.masks.items() if bool(m.any())}
    kwargs.setdefault("progressive", bool(getattr(selection.policy_object(), "progressive", False)))
    return build_sparse_adamw(model, masks, lr, freeze=freeze, no_decay=no_decay, **kwargs)


def build_sparse_adamw(model: nn.Module, masks: dict[str, torch.Tensor | None], lr: float, *, freeze: bool,
                       no_decay: ParamSpec | None, **kwargs: Any) -> SparseAdamW:
    """A :class:`SparseAdamW` over the parameters named in ``masks`` (None: trained whole), with a no-decay
    group; with ``freeze``, every other parameter stops requiring grad (names in ``optimizer.frozen``)."""
    if not masks:
        raise GradselError("the selection selects no element: there is nothing to optimize")
    params = dict(model.named_parameters())
    decay_off = set(resolve(model, no_decay, what="no_decay")) if no_decay is not None else set()
    groups = {True: {"params": [], "masks": []}, False: {"params": [], "masks": [], "weight_decay": 0.0}}
    for name, mask in masks.items():
        p = params[name]
        group = groups[name not in decay_off]
        group["params"].append(p)
        group["masks"].append(None if mask is None else mask.to(getattr(p, "_local_tensor", p).device))
    frozen = []
    if freeze:
        for name, p in params.items():
            if name not in masks and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                frozen.append(name)
    opt = SparseAdamW([g for g in groups.values() if g["params"]], lr=lr, **kwargs)
    opt.frozen = frozen
    return opt
