"""What a policy is: turns scores into boolean masks with an exact budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import GradselError
from ..fisher import Fisher, fisher

__all__ = ["Policy", "Context", "top_k", "split_budget", "masks_from_flat"]


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
