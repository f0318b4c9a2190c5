"""ird: Iterative Range Decreasing, data-driven sample and parameter selection (arXiv 2403.08484).

The paper's code is not public; this is gradsel's reading of it (see ``docs/ird.md``):

1. Start with the samples ``S₁`` (all of ``data``, or the first ``num_samples``) and all candidate
   elements ``P₁``.
2. Round ``r``, parameter step: the Fisher ``F_r`` over ``S_r`` (only the tensors that still hold an
   element of ``P_r`` are differentiated). The round's candidate mask is the top-``k`` of ``F_r`` within
   ``P_r``. The next element range ``P_{r+1}`` is the top ``max(k, ⌈|P_r|/2⌉)`` of ``F_r`` within ``P_r``.
3. Sample step (when ``|P_{r+1}| > k``): a second pass over ``S_r`` scores each sample by its Fisher
   contribution on the kept elements, ``c_i = Σ_{j∈P_{r+1}} g_ij²``; ``S_{r+1}`` is the top
   ``max(min_samples, ⌈|S_r|/2⌉)`` samples by ``c_i`` (ties: earlier position first).
4. Stop when the element range reaches ``k``, when the samples cannot shrink any more (``min_samples``:
   further halvings would rank the same Fisher again and end at the same top-``k``), or after
   ``max_rounds``. With ``evaluate(masks) -> float`` the best-scoring candidate wins (the later round on a
   tie); without it, the last.

Per-sample gradients are recomputed from the data in every pass and squared chunk by chunk, never held
for all samples: memory is O(parameters + samples). With ``R`` rounds over sample counts ``s_1 ≥ … ≥ s_R``
the search costs ``2·Σ s_r − s_R`` per-sample gradients (:func:`plan`); halving from ``N`` samples (a
multiple of ``2^(R−1)``), that is ``N·(4 − 6/2^R)`` < ``4N``: under four FISH passes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from ..errors import GradselError
from ..fisher import Fisher, fisher
from .base import Context, Policy, top_k
from .registry import register_policy

__all__ = ["IRD", "plan", "plot_rounds", "rounds_table"]


def _next_elements(size: int, k: int, fraction: float) -> int:
    """Size of the next element range: ``⌈size·fraction⌉``, strictly smaller, never below ``k``."""
    return max(k, min(size - 1, math.ceil(size * fraction)))


def _next_samples(size: int, min_samples: int, fraction: float) -> int:
    """Size of the next sample range: ``⌈size·fraction⌉``, strictly smaller, never below ``min_samples``
    (a range already at or below ``min_samples`` stays as it is)."""
    if size <= min_samples:
        return size
    return max(min_samples, min(size - 1, math.ceil(size * fraction)))


def plan(num_samples: int, total: int, k: int, *, min_samples: int = 16, max_rounds: int | None = None,
         sample_fraction: float = 0.5, param_fraction: float = 0.5) -> dict:
    """The rounds IRD runs for these sizes, and what they cost, without touching a model.

    Args:
        num_samples: samples in the first round (``N``).
        total: candidate elements in the first round.
        k: the budget.
        min_samples, max_rounds, sample_fraction, param_fraction: as for the policy.

    Returns:
        ``{"rounds": [{"round", "samples", "elements"}...], "sample_gradients": C, "fisher_passes": C / N}``
        where ``C = Σ_r s_r + Σ_{r<R} s_r`` counts per-sample gradients: one Fisher pass per round and one
        contribution pass per round but the last.

    >>> p = plan(256, 1_000_000, 2_000)
    >>> [(r["samples"], r["elements"]) for r in p["rounds"]]
    [(256, 1000000), (128, 500000), (64, 250000), (32, 125000), (16, 62500)]
    >>> p["sample_gradients"], p["fisher_passes"]
    (976, 3.8125)
    """
    rounds, s, p = [], num_samples, total
    while True:
        r = len(rounds) + 1
        rounds.append({"round": r, "samples": s, "elements": p})
        p_next = _next_elements(p, k, param_fraction)
        s_next = _next_samples(s, min_samples, sample_fraction)
        if p_next <= k or s_next >= s or (max_rounds is not None and r >= max_rounds):
            break
        s, p = s_next, p_next
    cost = 2 * sum(x["samples"] for x in rounds) - rounds[-1]["samples"]
    return {"rounds": rounds, "sample_gradients": cost, "fisher_passes": cost / num_samples}


@register_policy("ird")
class IRD(Policy):
    """Iterative Range Decreasing: alternately halve the candidate elements and the samples, by Fisher.

    Each round estimates the Fisher over the current samples, keeps the better half of the current
    elements, then keeps the half of the samples that contribute most Fisher on those elements. Each
    round's top-``k`` is a candidate mask; ``evaluate`` picks among them (default: the last). The rounds
    are kept in ``Selection.info["rounds"]`` (:func:`rounds_table`, :func:`plot_rounds`).

    The data are read once per pass and samples are named by their position in the data's order, so the
    data must come in the same order every time (no ``shuffle=True``). A ``fisher=`` given to ``select``
    that carries ``sample_index`` (every :func:`gradsel.fisher` result does) is reused as the first
    round's Fisher, and its samples become the first sample range.

    Options:
        evaluate: ``evaluate(masks) -> float`` (higher is better), called once per round with that
            round's candidate masks (name → bool tensor, candidates only). It must leave the model as it
            found it (train a copy). ``None``: the last round's candidate wins.
        min_samples: never keep fewer samples than this (default 16).
        max_rounds: stop after this many rounds (the last one's top-``k`` is then taken from a range
            larger than ``k``); ``None``: no limit.
        sample_fraction: share of the samples kept by each sample step (default 0.5).
        param_fraction: share of the elements kept by each parameter step (default 0.5).

    >>> import torch, torch.nn as nn, gradsel
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    >>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(4)]
    >>> sel = gradsel.select(model, data, "ird", keep=20, min_samples=8, progress=False)
    >>> sel.selected(), [(r["samples"], r["elements"]) for r in sel.info["rounds"]]
    (20, [(64, 387), (32, 194), (16, 97), (8, 49)])
    """

    def __init__(self, evaluate: Callable[[dict[str, torch.Tensor]], float] | None = None, min_samples: int = 16,
                 max_rounds: int | None = None, sample_fraction: float = 0.5, param_fraction: float = 0.5):
        super().__init__(evaluate=evaluate, min_samples=min_samples, max_rounds=max_rounds,
                         sample_fraction=sample_fraction, param_fraction=param_fraction)
        self.evaluate = evaluate
        self.min_samples = min_samples
        self.max_rounds = max_rounds
        self.sample_fraction = sample_fraction
        self.param_fraction = param_fraction

    # Options are checked here, not in __init__: a loaded Selection rebuilds the policy from its saved
    # options, where ``evaluate`` has become the callable's repr.
    def _check_options(self) -> None:
        if self.evaluate is not None and not callable(self.evaluate):
            raise GradselError(f"ird: evaluate must be a callable masks -> float, got {type(self.evaluate).__name__}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise GradselError(f"ird: min_samples must be a positive integer, got {self.min_samples!r}")
        if self.max_rounds is not None and (isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int)
                                            or self.max_rounds < 1):
            raise GradselError(f"ird: max_rounds must be a positive integer or None, got {self.max_rounds!r}")
        for name in ("sample_fraction", "param_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise GradselError(f"ird: {name} must be a fraction in (0, 1), got {value!r} (0.5 halves)")

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        self._check_options()
        data = ctx.data
        _check_data(data)
        opts = dict(ctx.fisher_options)
        progress = bool(opts.pop("progress", True))
        num_samples = opts.pop("num_samples", None)
        names = list(ctx.candidates)
        k = ctx.k

        range_masks: dict[str, torch.Tensor] | None = None  # P_r; None = every candidate element
        range_size = ctx.total
        sample_index: torch.Tensor | None = None  # S_r (positions in data); None before the first pass

        def read(index: torch.Tensor | None, **kwargs) -> Fisher:
            """One pass over S_r: the first reads the data's own batches, later ones their samples packed
            into full batches (``samples=``)."""
            if index is None:
                return fisher(ctx.model, data, num_samples=num_samples, progress=False, **opts, **kwargs)
            est = fisher(ctx.model, data, samples=index, progress=False, **opts, **kwargs)
            _same_samples(est, index)
            return est

        rounds: list[dict] = []
        best: tuple[float | None, int, dict[str, torch.Tensor]] | None = None
        cost = 0
        reused = False
        bar = tqdm(total=None, unit="round", desc="ird", disable=not progress, leave=False)
        try:
            while True:
                r = len(rounds) + 1
                # -- parameter step: the Fisher over S_r, on the tensors that still hold elements of P_r
                tensors = names if range_masks is None else [n for n in names if n in range_masks]
                if r == 1 and ctx._scores is not None and getattr(ctx._scores, "sample_index", None) is not None:
                    est, reused = ctx._scores, True
                else:
                    est = read(sample_index, params=tensors)
                sample_index = est.sample_index.cpu()
                cost += 0 if reused and r == 1 else est.num_samples
                n_samples = len(sample_index)
                if r == 1:
                    bar.total = len(plan(n_samples, range_size, k, **self._plan_options())["rounds"])
                    bar.refresh()
                next_size = _next_elements(range_size, k, self.param_fraction)
                next_samples = _next_samples(n_samples, self.min_samples, self.sample_fraction)
                last = (next_size <= k or next_samples >= n_samples
                        or (self.max_rounds is not None and r >= self.max_rounds))

                score = None
                if last or self.evaluate is not None:  # the top-k within P_r (= within P_{r+1})
                    candidate = _top_in_range(est, names, ctx.shapes, range_masks, k)
                    if self.evaluate is not None:
                        score = _score(self.evaluate, {n: m.clone() for n, m in candidate.items()}, r)
                    if best is None or score is None or score >= best[0]:
                        best = (score, r, candidate)
                rounds.append({"round": r, "samples": n_samples, "elements": range_size,
                               "sample_index": sample_index.tolist(), "score": score, "chosen": False})
                bar.update(1)
                bar.set_postfix(samples=n_samples, elements=range_size)
                if last:
                    break

                # -- sample step: each sample's Fisher on the kept elements P_{r+1}; keep the top of S_r
                kept = _top_in_range(est, names, ctx.shapes, range_masks, next_size)
                range_masks = {n: m for n, m in kept.items() if bool(m.any())}
                range_size = next_size
                del kept
                per_sample = {n: None if bool(m.all()) else m for n, m in range_masks.items()}
                contrib = read(sample_index, params=list(range_masks), per_sample=per_sample, scores=False)
                cost += contrib.num_samples
                _check_same_fisher(est, contrib, range_masks)
                keep = top_k({"c": contrib.per_sample}, next_samples)["c"]
                sample_index = sample_index[keep]
                del est, contrib
        finally:
            bar.close()

        _, chosen, masks = best
        rounds[chosen - 1]["chosen"] = True
        ctx.info.update({
            "rounds": rounds, "chosen_round": chosen, "sample_index": rounds[chosen - 1]["sample_index"],
            "sample_gradients": cost, "fisher_passes": cost / rounds[0]["samples"], "reused_fisher": reused,
        })
        return masks

    def _plan_options(self) -> dict:
        return {"min_samples": self.min_samples, "max_rounds": self.max_rounds,
                "sample_fraction": self.sample_fraction, "param_fraction": self.param_fraction}


def _check_data(data: Any) -> None:
    if data is None:
        raise GradselError("ird reads the data once per round: pass data to select() (fisher= alone is not enough)")
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise GradselError("ird names samples by their position in the data and reads the data several times: "
                           "a DataLoader with shuffle=True gives another order each time; pass shuffle=False")
    try:
        one_shot = iter(data) is data
    except TypeError:
        one_shot = False
    if one_shot:
        raise GradselError(f"ird reads the data several times, but got a one-shot iterator ({type(data).__name__}): "
                           "pass a list of batches or a DataLoader")


def _same_samples(est: Fisher, positions: torch.Tensor) -> None:
    if est.sample_index is None or not torch.equal(est.sample_index.cpu(), positions):
        raise GradselError("ird: the data gave other samples on a later read (fewer, or in another order): "
                           "it must yield the same samples in the same order every time it is iterated")


def _check_same_fisher(est: Fisher, contrib: Fisher, kept: dict[str, torch.Tensor]) -> None:
    """The contribution pass re-reads S_r, so its contributions must add up to the parameter step's Fisher
    on the kept elements: ``Σ_i c_i = |S_r| · Σ_{j∈P_{r+1}} F_r[j]`` (a free check that the data came
    again with the same samples at the same positions; ``read`` has already checked the positions)."""
    expected = est.num_samples * sum(float((est[n] * m.to(est[n].device)).sum(dtype=torch.float64))
                                     for n, m in kept.items())
    got = float(contrib.per_sample.sum())
    if not math.isclose(got, expected, rel_tol=1e-3, abs_tol=1e-30):
        raise GradselError("ird: a second pass over the same sample positions gave another Fisher "
                           f"(the samples' contributions add up to {got:.6g}, the Fisher on the kept elements to "
                           f"{expected:.6g}): the data must yield the same samples in the same order every time "
                           "(no shuffling, no random augmentation), and fisher= must come from this data")


def _top_in_range(est: Fisher, names: list[str], shapes: dict, range_masks: dict | None,
                  count: int) -> dict[str, torch.Tensor]:
    """The ``count`` largest Fisher entries inside the element range (every candidate when it is None).

    Only the range's entries compete (ties fall by parameter order, then flat index, as :func:`top_k` over
    all candidates would break them), and only the tensors that still hold range elements are read.
    """
    if range_masks is None:
        return top_k({n: est[n] for n in names}, count)
    chosen = top_k({n: est[n] for n in names if n in range_masks}, count, within=range_masks)
    return {n: chosen[n] if n in chosen else torch.zeros(tuple(shapes[n]), dtype=torch.bool) for n in names}


def _score(evaluate: Callable, masks: dict[str, torch.Tensor], r: int) -> float:
    value = evaluate(masks)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise GradselError(f"ird: evaluate returned {type(value).__name__} for round {r}; it must return a "
                           "float (higher is better)") from None
    if math.isnan(value):
        raise GradselError(f"ird: evaluate returned NaN for round {r}; return a comparable number")
    return value


def _rounds(obj: Any) -> list[dict]:
    """The rounds from a Selection, its ``info`` dict or the list itself."""
    if isinstance(obj, list):
        return obj
    info = obj if isinstance(obj, dict) else getattr(obj, "info", {})
    if "rounds" not in info:
        raise GradselError("no ird rounds here: pass a Selection made by policy='ird', its info or its rounds")
    return info["rounds"]


def rounds_table(obj: Any, *, markdown: bool = False) -> str:
    """Per round: samples, element range, evaluation score, and which round won."""
    from ..report import table

    rows = [{"round": r["round"], "samples": r["samples"], "elements": r["elements"],
             "score": "" if r["score"] is None else float(r["score"]), "chosen": "yes" if r["chosen"] else ""}
            for r in _rounds(obj)]
    return table(rows, ["round", "samples", "elements", "score", "chosen"], markdown=markdown)


def plot_rounds(obj: Any, path: str, *, title: str = "ird: range per round") -> str:
    """Sample and element ranges per round (log scale) and evaluation scores, as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = _rounds(obj)
    xs = [r["round"] for r in rounds]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, [r["samples"] for r in rounds], "o-", label="samples")
    ax.plot(xs, [r["elements"] for r in rounds], "s-", label="element range")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("round")
    ax.set_ylabel("range size")
    ax.set_xticks(xs)
    chosen = [r["round"] for r in rounds if r["chosen"]]
    for c in chosen:
        ax.axvline(c, color="k", ls=":", lw=1, label="chosen")
    scored = [(r["round"], r["score"]) for r in rounds if r["score"] is not None]
    handles, labels = ax.get_legend_handles_labels()
    if scored:
        ax2 = ax.twinx()
        ax2.plot(*zip(*scored), "^--", color="tab:red", label="evaluate score")
        ax2.set_ylabel("evaluate score")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)
