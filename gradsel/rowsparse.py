"""A backward that computes the weight gradient of the selected rows only: :func:`row_sparse`.

Autograd computes the whole weight gradient of a Linear or Conv layer as soon as one of its elements is
trained. For a selection made of whole rows (``gradsel.select(..., granularity="row")``), the weight
gradient of the other rows is wasted work: ``row_sparse(model, selection)`` gives every ``nn.Linear`` and
``nn.Conv1d/2d/3d`` whose weight mask leaves some rows out a forward through a custom autograd function,
whose backward computes

- the input gradient in full (``δ·W``: layers below still learn),
- the weight gradient of the *touched* rows only (rows with at least one selected element,
  ``δ[:, rows]ᵀ x``; for a convolution oneDNN's kernel on those rows or, for a few rows of a stride-1 2-D
  convolution with a 3×3 or larger kernel, one matmul over its kernel taps), written into a zero gradient of
  the weight's shape, or, with ``compact=True``, kept as those rows alone: a sparse COO gradient
  (``weight.grad.indices()`` the rows, ``.values()`` their gradient, as ``nn.Embedding(sparse=True)`` gives)
  that :class:`gradsel.optim.SparseAdamW` reads,
- the bias gradient in full (it costs a sum over ``δ``).

The gradient of every touched row is the dense one, so training under ``Selection.apply`` or
``SparseAdamW`` (which ignore everything outside the masks) follows the dense trajectory exactly. The
module classes, the state_dict and the parameters are not changed; ``.remove()`` (or leaving the ``with``
block) restores the plain forward.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import GradselError
from .params import unwrap_model

__all__ = ["row_sparse", "RowSparse"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _RowLinear(torch.autograd.Function):
    """``F.linear`` whose backward forms the weight gradient of ``rows`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, compact):
        weight = _cast(ctx, weight, x)
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.compact = rows, compact
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = ctx.rows
        g2 = grad.reshape(-1, grad.shape[-1])  # one copy at most (a transposed view's gradient), shared below
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g2.mm(weight).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1] and rows.numel():
            part = _columns(g2, rows).t().mm(x.reshape(-1, x.shape[-1]))
            gw = _weight_grad(ctx, weight, rows, part)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


def _cast(ctx, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight in the dtype of the (autocast) input; the parameter itself when they agree. The cast happens
    here, not in autograd, so that the weight gradient comes back in the parameter's dtype from this function
    (autograd cannot cast a sparse gradient back through ``.to``)."""
    ctx.weight_dtype = weight.dtype
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


def _weight_grad(ctx, weight: torch.Tensor, rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The gradient of ``rows`` (``part``) as the weight's gradient, in the parameter's dtype: the rows alone in
    a sparse COO tensor (``compact``; ``rows`` are sorted and distinct, so it is coalesced), else in a zero
    tensor of the weight's shape."""
    part = part.to(ctx.weight_dtype)
    if ctx.compact:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), part, weight.shape, is_coalesced=True,
                                       check_invariants=False)
    return torch.zeros_like(weight, dtype=part.dtype).index_copy_(0, rows, part)  # the weight's strides


def _columns(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``g[:, rows]`` as a new contiguous tensor: ``gather`` (parallel) on several threads, else ``index_select``."""
    if torch.get_num_threads() > 1:  # index_select along dim 1 runs on one thread; gather splits the rows
        return torch.gather(g, 1, rows.expand(g.shape[0], rows.numel()))
    return g.index_select(1, rows)


class _RowConv(torch.autograd.Function):
    """A convolution (``groups=1``, zero padding) whose backward forms the weight gradient of ``rows`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, compact, stride, padding, dilation):
        weight = _cast(ctx, weight, x)
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.compact, ctx.conf = rows, compact, (stride, padding, dilation)
        ctx.has_bias = bias is not None
        zeros = [0] * len(stride)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        zeros = [0] * len(stride)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False, zeros,
                                                     1, [True, False, False])[0]
        if ctx.needs_input_grad[1] and ctx.rows.numel():
            part = conv_rows_weight_grad(grad, x, weight, ctx.rows, stride, padding, dilation)
            gw = _weight_grad(ctx, weight, ctx.rows, part)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum([0] + list(range(2, grad.dim())))
        return gx, gw, gb, None, None, None, None, None


def conv_rows_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                          stride: list[int], padding: list[int], dilation: list[int], taps: bool | None = None
                          ) -> torch.Tensor:
    """The weight gradient of a (``groups=1``, zero-padded) convolution for output channels ``rows`` alone, shaped
    ``(len(rows), *weight.shape[1:])``: by kernel taps where :func:`_by_taps` says so (or ``taps``), else by
    oneDNN's weight-gradient kernel on the rows' output-gradient channels."""
    g_rows = grad.index_select(1, rows)
    if _by_taps(x, weight, g_rows, stride) if taps is None else taps:
        return _taps_weight_grad(x, g_rows, weight.shape[2:], padding, dilation)
    # the weight argument only gives the shape of the weight gradient: a view of the first rows, no copy
    return torch.ops.aten.convolution_backward(g_rows, x, weight[: rows.numel()], None, stride, padding, dilation,
                                               False, [0] * len(stride), 1, [False, True, False])[1]


# oneDNN's weight-gradient kernel works in blocks of 16 output channels and streams the whole input once per
# block, so below 16 rows its time stops falling with the rows. For a few rows of a 2-D stride-1 convolution with
# 3x3 or more kernel taps, one matmul over the taps (:func:`_taps_weight_grad`) is faster when there is enough work
# (input channels x output positions) to amortise its copies of the rows' gradient (taps x rows planes, kept within
# 1.25x the input's channel planes) and its Python loop over the taps; a 1x1 convolution is a plain matmul to oneDNN
# already. The rule below is where the taps won (taps / oneDNN <= 0.9, mostly 0.2-0.75) in a sweep of 3x3
# convolutions at batch 8 over 16-512 input channels, 8^2-128^2 positions and 1-32 rows, on one and on two threads of
# this project's 2-core CPU; 8 or more rows lost nearly everywhere (1.0-6x), as did 8^2 positions (up to 2.5x).
# benchmarks/row_conv_parts.py times both paths on every convolution of the Unet.
def _by_taps(x: torch.Tensor, weight: torch.Tensor, g_rows: torch.Tensor, stride: list[int]) -> bool:
    """Whether :func:`_taps_weight_grad` computes this weight gradient (a shape rule, measured on the CPU)."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and all(s == 1 for s in stride)):
        return False
    k, taps, positions, channels = g_rows.shape[1], weight[0, 0].numel(), g_rows.shape[2] * g_rows.shape[3], x.shape[1]
    work = channels * positions
    if taps < 9 or positions < 256 or 4 * taps * k > 5 * channels:
        return False
    return (taps * k <= 18 and work >= 32768) or (taps * k <= 36 and work >= 131072)


def _taps_weight_grad(x: torch.Tensor, g_rows: torch.Tensor, kernel: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> torch.Tensor:
    """The weight gradient of a stride-1 2-D convolution for the output channels in ``g_rows`` (B, k, Ho, Wo), as
    one batched matmul: tap (dy, dx) pairs output position (i, j) with input position (i + sy, j + sx), where
    ``sy = dy·dil − pad`` (the zero padding reads nothing), so the rows' gradient moved by (sy, sx) onto the input's
    grid (zeros where nothing lands), one copy per tap, stacked as (B, taps·k, H·W), times the input's transpose
    gives every tap of every row in one matmul whose rows are taps·k, not k. Each element of the copies is written
    once and the input is read in place (no padded copy of it)."""
    b, c, h, w = x.shape
    k, ho, wo = g_rows.shape[1:]
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    shifted = g_rows.new_empty(b, kh * kw, k, h, w)
    for dy in range(kh):
        sy = dy * dh - ph
        top, bottom = max(0, sy), min(h, ho + sy)  # the input rows that output rows 0..ho-1 reach through this tap
        for dx in range(kw):
            sx = dx * dw - pw
            left, right = max(0, sx), min(w, wo + sx)
            tap = shifted[:, dy * kw + dx]
            if top >= bottom or left >= right:  # the tap reads only padding
                tap.zero_()
                continue
            tap[..., top:bottom, left:right] = g_rows[..., top - sy: bottom - sy, left - sx: right - sx]
            for strip in (tap[..., :top, :], tap[..., bottom:, :], tap[..., top:bottom, :left],
                          tap[..., top:bottom, right:]):
                strip.zero_()
    part = torch.bmm(shifted.view(b, kh * kw * k, h * w), x.reshape(b, c, h * w).transpose(1, 2)).sum(0)
    return part.view(kh, kw, k, c).permute(2, 3, 0, 1).contiguous()


def _autocast(x: torch.Tensor, *tensors):
    """The tensors cast as autocast would cast them for a matmul (unchanged when autocast is off)."""
    kind = x.device.type
    if not (x.is_floating_point() and torch.is_autocast_enabled(kind)):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def _row_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward that :func:`row_sparse` binds to a layer; the plain one for a module it does not own (a copy)."""
    layer = _OWNERS.get(self)
    if layer is None or args or kwargs or not torch.is_grad_enabled():
        return type(self).forward(self, x, *args, **kwargs)
    rows = layer.rows(self.weight)
    if rows is None:  # every row touched now: nothing to skip
        return type(self).forward(self, x)
    weight, bias, compact = self.weight, self.bias, layer.compact
    cast = _autocast(x, bias)  # the weight is cast inside the Function
    if isinstance(self, nn.Linear):
        if cast is None:
            return _RowLinear.apply(x, weight, bias, rows, compact)
        with torch.autocast(x.device.type, enabled=False):
            return _RowLinear.apply(cast[0], weight, cast[1], rows, compact)
    d = len(self.stride)
    unbatched = x.dim() == d + 1
    conf = (list(self.stride), list(self.padding), list(self.dilation))
    if cast is None:
        out = _RowConv.apply(x.unsqueeze(0) if unbatched else x, weight, bias, rows, compact, *conf)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out = _RowConv.apply(cast[0].unsqueeze(0) if unbatched else cast[0], weight, cast[1], rows, compact, *conf)
    return out.squeeze(0) if unbatched else out


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, _Layer]" = weakref.WeakKeyDictionary()
#: weights ever given compact (sparse COO) row gradients, kept after remove(): a step after the ``with`` block
#: still knows that a row missing from their gradient is a mismatch of selections, not a zero row
COMPACT_WEIGHTS = WeakIdKeyDictionary()  # weight -> True; tensors compare by identity here


class _Layer:
    """One row-sparse layer: where its weight's mask is read from, and the touched rows derived from it."""

    def __init__(self, masks: Any, name: str, compact: bool, sharded_rows: torch.Tensor | None = None):
        self._source = masks
        self.name = name
        self.compact = compact
        self._seen: tuple | None = None
        self._rows: torch.Tensor | None = None
        # a ShardedSelection's mask is this rank's rows only: the touched rows of every rank, fixed at the call
        self._sharded = sharded_rows
        if sharded_rows is not None:
            mask = _masks_of(masks)[name]
            self._seen = (id(mask), mask._version)

    def rows(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Indices of the rows with a selected element, on the weight's device; None when all rows have one."""
        mask = _masks_of(self._source)[self.name]
        if self._sharded is not None:  # (re-deriving them would take a collective inside the forward)
            if (id(mask), mask._version) != self._seen:
                raise GradselError(f"the mask of {self.name!r} changed after row_sparse was called on this FSDP2 "
                                   "model: call remove() and row_sparse(model, selection) again on every rank")
            if self._rows is None or self._rows.device != weight.device:
                self._rows = self._sharded.nonzero().flatten().to(weight.device)
            return self._rows
        key = (id(mask), mask._version, weight.device)
        if key != self._seen:  # the selection changed (a progressive policy) or the model moved
            touched = mask.reshape(mask.shape[0], -1).any(1)
            self._rows = None if bool(touched.all()) else touched.nonzero().flatten().to(weight.device)
            self._seen = key
        return self._rows


def _touched_rows(masks: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """``name -> `` a bool over the weight's full dim 0: its rows with a selected element. A
    :class:`gradsel.fsdp.ShardedSelection` holds this rank's rows of each mask only: every rank's, by one
    all-reduce (every rank calls row_sparse), so that each rank's backward forms the rows that any rank selected
    (FSDP2 sums the ranks' gradients into the shard that holds each row)."""
    current = _masks_of(masks)
    if not hasattr(masks, "layouts"):
        return {n: current[n].reshape(current[n].shape[0], -1).any(1) for n in names}
    from .fsdp import full_rows
    from .policies.base import _row_view

    local = {n: _row_view(current[n], masks.layouts[n].rows).any(1).long() for n in names}  # (a shard may be empty)
    return {n: t > 0 for n, t in full_rows(local, masks.layouts, masks.group).items()}


def _masks_of(source: Any) -> dict[str, torch.Tensor]:
    return source.masks if hasattr(source, "masks") else source


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module`` keeps its dense backward, or None."""
    base = nn.Linear if isinstance(module, nn.Linear) else next(c for c in _CONV if isinstance(module, c))
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward"
    if isinstance(module, _CONV):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (a string)"
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance already (another tool's wrapper)"
    return None


class RowSparse:
    """The handle :func:`row_sparse` returns: a context manager, ``.remove()``, and what it changed.

    Attributes:
        layers: layer name → (touched rows, rows) at the time of the call, for every layer made row-sparse.
        skipped: layer name → why a layer whose weight leaves rows out keeps the dense backward.
    """

    def __init__(self, model: nn.Module, masks: Any, compact: bool = False):
        self.compact = compact
        self._modules: list[nn.Module] = []
        self.layers: dict[str, tuple[int, int]] = {}
        self.skipped: dict[str, str] = {}
        self.removed = False
        current = _masks_of(masks)
        layers = []
        for prefix, module in model.named_modules():
            wname = f"{prefix}.weight" if prefix else "weight"
            if isinstance(module, (nn.Linear, *_CONV)) and wname in current:
                layers.append((prefix, module, wname))
        rows = _touched_rows(masks, [wname for _, _, wname in layers])
        sharded = hasattr(masks, "layouts")
        for prefix, module, wname in layers:
            touched = int(rows[wname].sum())
            if touched == rows[wname].numel():
                continue  # every row has a selected element: nothing to skip
            if module in _OWNERS:
                self.remove()
                raise GradselError(f"layer {prefix!r} is row-sparse already (row_sparse called twice on this "
                                   "model): remove() the first handle before making another")
            reason = _unsupported(module)
            if reason:
                self.skipped[prefix] = reason
                continue
            _OWNERS[module] = _Layer(masks, wname, compact, rows[wname] if sharded else None)
            if compact:
                COMPACT_WEIGHTS[module.weight] = True
            module.forward = types.MethodType(_row_forward, module)
            self._modules.append(module)
            self.layers[prefix] = (touched, rows[wname].numel())

    def remove(self) -> None:
        """Give every layer its plain forward back. Idempotent."""
        for module in self._modules:
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is _row_forward:
                del module.__dict__["forward"]
            _OWNERS.pop(module, None)
        self._modules.clear()
        self.removed = True

    def __enter__(self) -> "RowSparse":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"RowSparse(layers={len(self.layers)}, skipped={len(self.skipped)}, compact={self.compact}, "
                f"removed={self.removed})")


def row_sparse(model: nn.Module, selection: Any, *, compact: bool = False) -> RowSparse:
    """Compute the weight gradient of the selected rows only, in every Linear and Conv layer that can.

    A layer is made row-sparse when its weight is in the selection and some of its rows (dim-0 slices)
    have no selected element; its backward then skips those rows' weight gradient (they get zeros) and
    computes the input gradient in full. Pair it with ``selection.apply(model, optimizer)`` or
    ``selection.optimizer(model)``: the masks still decide what trains, row_sparse only saves the work. The
    masks are re-read when they change (progressive policies).

    Args:
        model: the model (``torch.compile`` / DDP wrappers are looked through).
        selection: a :class:`gradsel.Selection` made for ``model`` (best with ``granularity="row"``), or a
            dict parameter name → bool mask.
        compact: give each row-sparse weight a gradient of its touched rows only, a sparse COO tensor
            (``weight.grad.indices()[0]`` the rows, ``.values()`` their gradient), instead of a dense gradient
            that is zero elsewhere: no zero-filling or copy of the weight's shape in backward, and no gradient
            memory outside the rows. Train with ``selection.optimizer(model)`` (:class:`~gradsel.optim.SparseAdamW`
            reads the selected entries from it; clip with its ``clip_grad_norm_``); ``Selection.apply`` and
            torch's dense optimizers refuse sparse gradients, and so does DDP's and FSDP2's gradient reduction
            (a DDP-wrapped or ``fully_shard`` model is refused with compact=True).

    Returns:
        A :class:`RowSparse` handle (context manager, ``.remove()``; ``.layers``, ``.skipped``).

    >>> import torch, torch.nn as nn, gradsel
    >>> from gradsel.rowsparse import row_sparse
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sel = gradsel.select(model, None, "random", keep=10, granularity="row", progress=False)
    >>> with row_sparse(model, sel) as rs:
    ...     model(torch.randn(3, 4)).sum().backward()
    >>> rs.layers["0"][0] == int(sel.masks["0.weight"].any(1).sum())
    True
    >>> bool((model[0].weight.grad[~sel.masks["0.weight"].any(1)] == 0).all())
    True
    """
    inner = unwrap_model(model)
    if compact:
        from .distributed import is_fsdp

        outer = (model, getattr(model, "_orig_mod", model))  # DDP, or torch.compile of DDP
        ddp = any(c.__name__ == "DistributedDataParallel" for m in outer for c in type(m).__mro__)
        if ddp or is_fsdp(inner):
            raise GradselError(f"compact=True gives sparse row gradients, which {'DDP' if ddp else 'FSDP2'}'s "
                               "gradient reduction does not take: use row_sparse(model, selection) (compact=False) "
                               "under torch.distributed")
    model = inner
    if hasattr(selection, "check") and hasattr(selection, "masks"):
        selection.check(model)
    elif not isinstance(selection, dict) or not all(isinstance(m, torch.Tensor) for m in selection.values()):
        raise GradselError(f"row_sparse needs a gradsel.Selection or a dict of bool masks, got "
                           f"{type(selection).__name__}; make one with gradsel.select(..., granularity='row')")
    else:
        params = dict(model.named_parameters())
        unknown = [n for n in selection if n not in params]
        wrong = [n for n in selection if n in params and tuple(selection[n].shape) != tuple(params[n].shape)]
        if unknown:
            raise GradselError(f"the masks name {unknown[:3]}, which {type(model).__name__} does not have: they "
                               "were made for a different model")
        if wrong:
            raise GradselError(f"the mask for {wrong[0]!r} has shape {tuple(selection[wrong[0]].shape)}, the parameter "
                               f"{tuple(params[wrong[0]].shape)}: the masks were made for a different model")
        bad = [n for n, m in selection.items() if m.dtype != torch.bool]
        if bad:
            raise GradselError(f"the mask for {bad[0]!r} is {selection[bad[0]].dtype}, not bool: pass bool masks "
                               "(True = trained)")
    return RowSparse(model, selection, bool(compact))
