"""What a policy is: turns scores into boolean masks with an exact budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import GradselError
from ..fisher import Fisher, fisher

__all__ = ["Policy", "Context", "top_k", "split_budget", "masks_from_flat", "row_units", "top_rows", "fill_rows",
           "rows_taken", "rank_rows", "RowView", "output_dims"]


@dataclass
class Context:
    """Everything a policy may look at when it selects.

    Attributes:
        model: the model being selected for.
        data: the batches passed to ``select`` (may be None when ``fisher=`` was given).
        candidates: candidate parameter names, in the model's order.
        shapes: name → shape of every candidate.
        k: the exact number of candidate elements to select.
        seed: the seed for any randomness.
        fisher_options: keyword arguments for :func:`gradsel.fisher` (loss, forward, num_samples, ...).
        info: a dict the policy may fill with anything to keep on the Selection (history, rounds).
    """

    model: nn.Module
    data: Any
    candidates: list[str]
    shapes: dict[str, torch.Size]
    k: int
    seed: int = 0
    fisher_options: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    _scores: Fisher | None = None

    @property
    def total(self) -> int:
        """Number of candidate elements."""
        return sum(int(torch.Size(s).numel()) for s in self.shapes.values())

    def scores(self) -> Fisher:
        """The Fisher over the candidates: the one passed as ``fisher=``, else estimated once from ``data``."""
        if self._scores is None:
            if self.data is None:
                raise GradselError("this policy needs Fisher scores: pass data to select() or fisher=")
            self._scores = fisher(self.model, self.data, params=self.candidates, **self.fisher_options)
        return self._scores

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


class Policy:
    """Base class of selection policies. A subclass implements :meth:`select`; that is all.

    Options passed to ``gradsel.select(..., **options)`` arrive as keyword arguments of ``__init__``
    and are kept in ``self.options`` (saved with the selection).

    Progressive policies (which change the masks during training) also implement
    :meth:`controller`, returning an object with ``step()``, ``state_dict()`` and ``load_state_dict()``.
    """

    name: str = ""
    #: True when the policy's masks change during training (``handle.step()`` drives it).
    progressive: bool = False
    #: budget used when ``keep`` is not given; None means keep= is required.
    default_keep: float | int | None = None

    def __init__(self, **options: Any):
        self.options = options

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        """Return a bool mask per candidate with exactly ``ctx.k`` True entries in total."""
        raise NotImplementedError

    def controller(self, selection, model: nn.Module, handle) -> Any:
        """For progressive policies: the object that ``handle.step()`` calls. Static policies: None."""
        return None

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


class FunctionPolicy(Policy):
    """A policy written as a plain function ``fn(ctx) -> masks``."""

    def __init__(self, fn: Callable[[Context], dict[str, torch.Tensor]], **options: Any):
        super().__init__(**options)
        self.fn = fn

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        return self.fn(ctx, **self.options)


def masks_from_flat(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Cut a flat bool vector into per-parameter masks (name order of ``shapes``)."""
    out, start = {}, 0
    for name, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        out[name] = flat[start:start + n].reshape(shape).clone()
        start += n
    return out


def top_k(scores: dict[str, torch.Tensor], k: int, *, largest: bool = True,
          within: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Exactly ``k`` True entries at the largest (or smallest) scores over all tensors together.

    Ties are broken by position: parameter order, then flat index within the parameter, earlier first.
    No ``score >= threshold`` test, so a block of equal scores (LoRA's zero B at initialisation) cannot
    inflate the count. With ``within`` (name → bool mask of the score's shape, for every name), only the
    entries inside the masks compete and everything outside comes back False.

    >>> import torch
    >>> m = top_k({"a": torch.tensor([0., 0., 0.]), "b": torch.tensor([1., 0.])}, 2)
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False, False], [True, False])
    >>> m = top_k({"a": torch.tensor([3., 2., 1.])}, 1, within={"a": torch.tensor([False, True, True])})
    >>> m["a"].tolist()
    [False, True, False]
    """
    # one dtype that holds every score exactly (float32 unless a score is float64): ranking in it is
    # ranking the scores themselves, and float32 halves the memory traffic of the selection
    dtype = torch.float32
    for t in scores.values():
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else torch.float64
    full = {n: t.detach().to("cpu", dtype) for n, t in scores.items()}
    inside = {n: None if within is None else torch.as_tensor(within[n], dtype=torch.bool).cpu().reshape(t.shape)
              for n, t in full.items()}
    flat = torch.cat([t.reshape(-1) if m is None else t[m] for t, m in zip(full.values(), inside.values())])
    if torch.isnan(flat).any():
        raise GradselError("scores contain NaN: the Fisher estimate is broken; check the data and the loss")
    total = flat.numel()
    if not 0 <= k <= total:
        raise GradselError(f"cannot select {k} of {total} elements")
    if k in (0, total):
        return {n: torch.full(t.shape, k > 0, dtype=torch.bool) if m is None else m.clone() & (k > 0)
                for (n, t), m in zip(full.items(), inside.values())}
    # the k-th largest is the (total-k+1)-th smallest; strictly better scores are in, ties by position
    threshold = torch.kthvalue(flat, total - k + 1 if largest else k).values
    need = k - int((flat > threshold).sum() if largest else (flat < threshold).sum())
    masks = {}
    for (n, t), m in zip(full.items(), inside.values()):
        mask = t > threshold if largest else t < threshold
        if m is not None:
            mask &= m
        if need > 0:  # the ties that fill the budget come from the first tensors holding the threshold
            tie = t == threshold if m is None else (t == threshold) & m
            first = tie.reshape(-1).nonzero().flatten()[:need]
            mask.view(-1)[first] = True
            need -= len(first)
        masks[n] = mask
    return masks


def split_budget(sizes: list[int], k: int) -> list[int]:
    """Split ``k`` over groups in proportion to their sizes, summing to exactly ``k`` (largest remainder)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    parts = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: k - sum(parts)]:
        parts[i] += 1
    return parts


# -- row budgets (granularity="row") ---------------------------------------------------------------------

GRANULARITIES = ("element", "row", "head")


def check_granularity(granularity: str) -> str:
    """``granularity`` if known, else a GradselError naming the known ones."""
    if granularity not in GRANULARITIES:
        raise GradselError(f"granularity={granularity!r} is not known: use one of {GRANULARITIES} ('row' keeps "
                           "whole output rows of weights, so that gradsel.rowsparse can skip the others' gradients; "
                           "'head' keeps rows too, with the query/key/value projections' rows grouped by attention head)")
    return granularity


_QKV = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin", "k_lin", "v_lin")  # HF BERT, Llama, DistilBERT
_FUSED_QKV = ("qkv", "query_key_value", "Wqkv")  # timm, GPT-NeoX, MPT: each head's query, key and value
_HEAD_DIM = ("head_dim", "attention_head_size", "dim_per_head")
_NUM_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def attention_heads(model: nn.Module, candidates: list[str]) -> dict[str, int]:
    """Where the model says its attention heads are: candidate tensor → the number of head blocks it holds.

    An attention module says so by an integer attribute: its head size (``head_dim``: timm, Llama,
    ``nn.MultiheadAttention``; ``attention_head_size``: HF BERT) or its number of heads (``num_heads``,
    ``num_attention_heads``, ``n_heads``). Its query, key and value projections (children named ``query``/
    ``key``/``value``, ``q_proj``/…, ``q_lin``/…, or fused ``qkv``/``query_key_value``/``Wqkv``; an
    ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias``) hold one block of ``head_dim`` consecutive
    output rows per head (the key and value projections of grouped-query attention hold fewer; a fused one
    holds each head's query, key and value as blocks). A projection whose rows are not a whole number of
    head blocks is left out.
    """
    wanted, params = set(candidates), dict(model.named_parameters())
    out: dict[str, int] = {}
    for mod_name, module in model.named_modules():
        head_dim, heads = _int_attr(module, _HEAD_DIM), _int_attr(module, _NUM_HEADS)
        if head_dim is None and heads is None:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            tensors = {f"{prefix}in_proj_weight": 3, f"{prefix}in_proj_bias": 3}  # q, k, v stacked
        else:
            tensors = {f"{prefix}{child}.{attr}": 3 if child in _FUSED_QKV else 1
                       for child, _ in module.named_children() if child in _QKV + _FUSED_QKV
                       for attr in ("weight", "bias")}
        for name, parts in tensors.items():
            p = params.get(name)
            if name not in wanted or p is None or p.dim() < 1:
                continue
            size = head_dim or (p.shape[0] // (parts * heads) if p.shape[0] % (parts * heads) == 0 else 0)
            if size and p.shape[0] % size == 0 and p.shape[0] // size > 1:
                out[name] = p.shape[0] // size
    return out


def head_shapes(model: nn.Module, shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """``shapes`` with every attention projection found by :func:`attention_heads` seen as ``(head blocks,
    elements per block)``: as rows, each block is one unit of a ``granularity="head"`` ranking (the blocks are
    consecutive output rows, so a mask of that shape reshapes back exactly). A GradselError when the model
    says nothing about heads."""
    heads = attention_heads(model, list(shapes))
    if not heads:
        raise GradselError("granularity='head' found no attention heads among the candidates: the model's attention "
                           "modules must say their head size or count (an attribute head_dim, attention_head_size, "
                           "num_heads or num_attention_heads) and hold query/key/value projections named query/key/"
                           "value, q_proj/k_proj/v_proj or qkv; use granularity='row' otherwise")
    return {n: torch.Size((heads[n], torch.Size(s).numel() // heads[n])) if n in heads else torch.Size(s)
            for n, s in shapes.items()}


def output_dims(model: nn.Module, candidates: list[str]) -> dict[str, int]:
    """Candidate weights whose output rows lie on dim 1, not dim 0: transformers' ``Conv1D`` (GPT-2's
    projections, weight ``(in, out)``) and ``nn.ConvTranspose1d/2d/3d`` with ``groups=1`` (weight
    ``(in, out, *kernel)``). A transposed convolution with groups keeps dim-0 rows (its output channels are
    not one slice of the weight)."""
    wanted, out = set(candidates), {}
    for mod_name, module in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if name not in wanted or not isinstance(module._parameters.get("weight"), torch.Tensor):
            continue
        conv1d = type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
        if conv1d or (isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups == 1):
            out[name] = 1
    return out


def _moved(shape: torch.Size, dim: int) -> torch.Size:
    return torch.Size([shape[dim], *shape[:dim], *shape[dim + 1:]])


class RowView:
    """The candidates as the row policies see them: each tensor with its output rows on dim 0 (a transposed
    weight's dim 1 moved there: :func:`output_dims`) and, for ``granularity="head"``, an attention projection's
    rows in blocks of one head (:func:`head_shapes`). :meth:`rows` maps tensors into that view,
    :meth:`back` maps masks out of it."""

    def __init__(self, model: nn.Module, shapes: dict[str, torch.Size], granularity: str):
        self.original = {n: torch.Size(s) for n, s in shapes.items()}
        self.dims = output_dims(model, list(shapes))
        self.moved = {n: _moved(s, self.dims[n]) if n in self.dims else s for n, s in self.original.items()}
        self.shapes = head_shapes(model, self.moved) if granularity == "head" else self.moved

    def rows(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: (t.movedim(self.dims[n], 0) if n in self.dims else t).reshape(self.shapes[n])
                for n, t in tensors.items()}

    def back(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: m.reshape(self.moved[n]).movedim(0, self.dims[n]).contiguous() if n in self.dims
                else m.reshape(self.original[n]) for n, m in masks.items()}


def row_units(shapes: dict[str, torch.Size]) -> list[tuple[str, ...]]:
    """Candidate tensors grouped into units whose dim-0 rows are selected together.

    A tensor of two or more dimensions is a unit of its dim-0 slices (output rows of a Linear weight,
    output channels of a Conv weight). A ``<module>.bias`` (1-D, or 2-D as :func:`head_shapes` sees it) whose sibling ``<module>.weight`` is a
    candidate of two or more dimensions with the same dim 0 joins that weight's unit: row ``i`` is
    ``weight[i]`` and ``bias[i]`` together. Every other tensor (norm weights and biases, lone 1-D tensors,
    scalars) is a unit whose rows are its single elements. Units come in the order of their first tensor.

    >>> import torch
    >>> row_units({"fc.weight": torch.Size([3, 4]), "fc.bias": torch.Size([3]), "ln.weight": torch.Size([4])})
    [('fc.weight', 'fc.bias'), ('ln.weight',)]
    """
    shapes = {n: torch.Size(s) for n, s in shapes.items()}
    joined = {}
    for name, shape in shapes.items():
        if len(shape) >= 1 and name.endswith("bias"):
            weight = name[: -len("bias")] + "weight"
            if weight in shapes and len(shapes[weight]) >= 2 and shapes[weight][0] == shape[0]:
                joined[weight] = name
    taken = set(joined.values())
    return [(n, joined[n]) if n in joined else (n,) for n in shapes if n not in taken]


def _unit_rows(shapes: dict[str, torch.Size], unit: tuple[str, ...]) -> tuple[int, int]:
    """(number of rows, elements per row) of a unit."""
    shape = torch.Size(shapes[unit[0]])
    if len(shape) < 2:
        return shape.numel(), 1  # a scalar is one row of one element
    rows = shape[0]
    return rows, sum(torch.Size(shapes[n]).numel() // rows for n in unit) if rows else 0


def _row_view(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows, t.numel() // rows if rows else 0)


def fill_rows(shapes: dict[str, torch.Size], units: list[tuple[str, ...]], order: torch.Tensor, k: int,
              partial) -> tuple[dict[str, torch.Tensor], dict]:
    """Masks holding whole rows in ``order`` until ``k`` elements are selected, exactly.

    Rows are numbered unit by unit (units in ``units`` order, rows in index order). The rows taken are the
    longest prefix of ``order`` whose sizes add up to at most ``k``; when that leaves ``r > 0`` elements of
    the budget, the next row in ``order`` is taken partly: ``partial(unit, row, r)`` returns which ``r`` of its
    elements (a bool vector over the row's elements, the unit's tensors concatenated in unit order).
    So at most one row is partial, and it is the next one in ranking order.

    Returns:
        (masks, info): info holds ``whole_rows``, ``rows`` (the number of rows) and ``partial_row``
        (``"name[i]"`` of the partial row's first tensor, or None).
    """
    dims = [_unit_rows(shapes, u) for u in units]
    starts, chosen, whole, remainder = rows_taken(dims, order, k)
    masks, extra, partial_name = {}, None, None
    if remainder > 0:
        row = int(order[whole])
        u = max(i for i in range(len(units)) if starts[i] <= row)
        extra = (u, row - starts[u], partial(units[u], row - starts[u], remainder))
        if extra[2].dtype != torch.bool or int(extra[2].sum()) != remainder or extra[2].numel() != dims[u][1]:
            raise GradselError("internal: a partial row must be a bool vector over the row with the remainder set")
        partial_name = f"{units[u][0]}[{row - starts[u]}]"
    for i, (unit, (rows, _)) in enumerate(zip(units, dims)):
        picked = chosen[starts[i]:starts[i] + rows]
        offset = 0
        for name in unit:
            shape = torch.Size(shapes[name])
            mask = picked.reshape(rows, 1).expand(rows, shape.numel() // rows if rows else 0).clone()
            if extra is not None and extra[0] == i:
                width = mask.shape[1]
                mask[extra[1]] = extra[2][offset:offset + width]
                offset += width
            masks[name] = mask.reshape(shape)
    return masks, {"rows": starts[-1], "whole_rows": whole, "partial_row": partial_name}


def rows_taken(dims: list[tuple[int, int]], order: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor, int, int]:
    """What :func:`fill_rows` takes for units of ``dims`` ((rows, elements per row) each) in ``order``: the global
    number of each unit's first row (and the total last), the rows taken whole (a bool per row), how many, and the
    elements left for the next row in ``order`` (0: none is partial)."""
    sizes = torch.cat([torch.full((r,), s, dtype=torch.int64) for r, s in dims]) if dims else torch.zeros(0)
    starts = [0]
    for r, _ in dims:
        starts.append(starts[-1] + r)
    total = int(sizes.sum())
    if not 0 <= k <= total:
        raise GradselError(f"cannot select {k} of {total} elements")
    cum = sizes[order].cumsum(0)
    whole = int(torch.searchsorted(cum, torch.tensor(k), right=True))
    chosen = torch.zeros(len(sizes), dtype=torch.bool)
    chosen[order[:whole]] = True
    return starts, chosen, whole, k - (int(cum[whole - 1]) if whole else 0)


def rank_rows(scores: dict[str, torch.Tensor], units: list[tuple[str, ...]], *, largest: bool = True) -> torch.Tensor:
    """Global row numbers ordered by Fisher mass (the sum over the row), largest (or smallest) first.

    Ties keep row order (units in order, then row index), as :func:`top_k` breaks ties by position.
    """
    shapes = {n: scores[n].shape for u in units for n in u}
    masses = []
    for unit in units:
        rows, _ = _unit_rows(shapes, unit)
        masses.append(sum(_row_view(scores[n].detach().to("cpu", torch.float64), rows).sum(1) for n in unit))
    mass = torch.cat(masses) if masses else torch.zeros(0, dtype=torch.float64)
    if torch.isnan(mass).any():
        raise GradselError("scores contain NaN: the Fisher estimate is broken; check the data and the loss")
    return torch.sort(mass, descending=largest, stable=True).indices


def top_rows(scores: dict[str, torch.Tensor], k: int, *, largest: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Exactly ``k`` elements as whole rows of largest (or smallest) Fisher mass, one row possibly partial.

    Rows are those of :func:`row_units`, ranked by :func:`rank_rows`; :func:`fill_rows` takes them in that
    order. The partial row keeps its ``r`` largest (smallest) entries, ties by position.

    >>> import torch
    >>> s = {"fc.weight": torch.tensor([[1., 1.], [5., 0.], [2., 2.]]), "fc.bias": torch.tensor([0., 0., 9.])}
    >>> m, info = top_rows(s, 4)  # row 2 (mass 13) whole, then 1 element of row 1 (mass 5)
    >>> m["fc.weight"].tolist(), m["fc.bias"].tolist(), info["partial_row"]
    ([[False, False], [True, False], [True, True]], [False, False, True], 'fc.weight[1]')
    """
    shapes = {n: t.shape for n, t in scores.items()}
    units = row_units(shapes)

    def partial(unit, row, r):
        part = top_k({n: _row_view(scores[n].detach(), _unit_rows(shapes, unit)[0])[row] for n in unit}, r,
                     largest=largest)
        return torch.cat([part[n] for n in unit])

    return fill_rows(shapes, units, rank_rows(scores, units, largest=largest), k, partial)
