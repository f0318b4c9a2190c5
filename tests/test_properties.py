"""Property tests (hypothesis): exact budgets, determinism and the tie rule, for random shapes and many ties.

Scores are integer-valued floats from a small range (float32 and float64), so most of them tie; ``keep`` is
drawn as a fraction and as a count; ``top_k`` gets random ``within`` masks; ``fish`` / ``reverse`` run with
both budgets (``global`` and ``per_tensor``). Every registered policy goes through the budget property:
static ones on a precomputed :class:`gradsel.Fisher` built from the random scores, ``ird`` (which reads
data in every round) on a tiny model and batch, ``jsdrift`` (progressive) on its starting selection.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsel
from gradsel.fisher import Fisher
from gradsel.policies import get_policy, split_budget, top_k
from gradsel.selection import resolve_budget

from .ranking import stable_top_k

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = settings(max_examples=60, deadline=None, database=None)
SLOW = settings(max_examples=8, deadline=None, database=None)  # a model run per example (ird)

# policies the static property cannot run, and why; each has its own property below
OWN_PROPERTY = {
    "ird": "reads the data in every round (fisher= alone is not enough): runs on a tiny model below",
    "jsdrift": "progressive: starts with every candidate (keep=1.0) and freezes during training: below",
}
STATIC = [p for p in gradsel.list_policies() if p not in OWN_PROPERTY]


@st.composite
def tied_scores(draw, max_tensors=3, max_side=5):
    """name → integer-valued float tensor (values 0..3, dtype float32 or float64 per tensor)."""
    shapes = draw(st.lists(st.lists(st.integers(1, max_side), min_size=1, max_size=2), min_size=1,
                           max_size=max_tensors))
    out = {}
    for i, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        values = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        out[f"p{i}"] = torch.tensor(values, dtype=dtype).reshape(shape)
    return out


@st.composite
def keeps(draw, total):
    """``keep`` as a fraction in (0, 1] or as an integer count in 1..total."""
    if draw(st.booleans()):
        return draw(st.floats(min_value=1e-3, max_value=1.0, allow_nan=False))
    return draw(st.integers(1, total))


class Holder(nn.Module):
    """A model whose parameters have the given shapes (``p0``, ``p1``, ... in order), zero-valued."""

    def __init__(self, scores: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in scores.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(t.shape)))


def _flat(masks, names):
    return torch.cat([masks[n].reshape(-1) for n in names])


@given(scores=tied_scores(), largest=st.booleans(), data=st.data())
@FAST
def test_top_k_is_a_stable_sort_of_tied_scores_within_masks(scores, largest, data):
    use_within = data.draw(st.booleans(), label="within")
    within = None
    if use_within:
        within = {n: torch.tensor(data.draw(st.lists(st.booleans(), min_size=t.numel(), max_size=t.numel())),
                                  dtype=torch.bool).reshape(t.shape) for n, t in scores.items()}
    room = sum(t.numel() for t in scores.values()) if within is None else sum(int(m.sum()) for m in within.values())
    k = data.draw(st.integers(0, room), label="k")
    got = top_k(scores, k, largest=largest, within=within)
    assert [got[n].shape for n in scores] == [t.shape for t in scores.values()]
    flat = _flat(got, scores)
    assert int(flat.sum()) == k
    assert torch.equal(flat, stable_top_k(scores, k, largest=largest, within=within))
    if within is not None:
        assert not bool((flat & ~_flat(within, scores)).any())


def _budgets(policy):
    try:
        get_policy(policy, budget="per_tensor")
    except gradsel.GradselError:
        return [None]
    return ["global", "per_tensor"]


@pytest.mark.parametrize("policy", STATIC)
@given(scores=tied_scores(), data=st.data())
@FAST
def test_every_static_policy_selects_exactly_the_budget_deterministically(policy, scores, data):
    total = sum(t.numel() for t in scores.values())
    keep = data.draw(keeps(total), label="keep")
    budget = data.draw(st.sampled_from(_budgets(policy)), label="budget")
    opts = {} if budget is None else {"budget": budget}
    fisher = Fisher({n: t.clone() for n, t in scores.items()}, num_samples=1)
    model = Holder(scores)
    k = resolve_budget(keep, total)

    def run():
        return gradsel.select(model, None, policy, keep=keep, fisher=fisher, progress=False, **opts)

    sel = run()
    assert sel.selected() == sel.budget == k
    assert sum(int(m.sum()) for m in sel.masks.values()) == k
    again = run()
    assert all(torch.equal(sel.masks[n], again.masks[n]) for n in scores)
    if policy in ("fish", "reverse"):  # the ranking itself: a stable sort, best first (reverse: worst)
        largest = policy == "fish"
        if budget == "global":
            assert torch.equal(_flat(sel.masks, scores), stable_top_k(scores, k, largest=largest))
        else:
            parts = split_budget([t.numel() for t in scores.values()], k)
            for (n, t), part in zip(scores.items(), parts):
                assert int(sel.masks[n].sum()) == part
                assert torch.equal(sel.masks[n].reshape(-1), stable_top_k({n: t}, part, largest=largest))


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), data=st.data())
@FAST
def test_split_budget_is_exact_and_proportional(sizes, data):
    k = data.draw(st.integers(0, sum(sizes)), label="k")
    parts = split_budget(sizes, k)
    assert sum(parts) == k
    assert all(0 <= p <= s and abs(p - k * s / sum(sizes)) < 1 for p, s in zip(parts, sizes))


class Tiny(nn.Module):
    """Two-class logits ``±<x, θ>`` over all parameters flattened: per-sample gradients ``c_i·x_i``."""

    def __init__(self, shapes):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for i, shape in enumerate(shapes):
            self.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)))

    def forward(self, x):
        theta = torch.cat([p.reshape(-1) for p in self.parameters()])
        s = x @ theta
        return torch.stack([s, -s], dim=-1)


@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=2), min_size=1, max_size=3),
       data=st.data())
@SLOW
def test_ird_selects_exactly_the_budget_deterministically(shapes, data):
    model = Tiny(shapes)
    total = sum(p.numel() for p in model.parameters())
    keep = data.draw(keeps(total), label="keep")
    # 0/1 inputs with repeated rows: tied element scores and tied sample contributions
    rows = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=total, max_size=total),
                                           min_size=2, max_size=4)), dtype=torch.float64)
    x = rows.repeat(8, 1)[:16]
    y = torch.arange(16) % 2
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]

    def run():
        return gradsel.select(model, batches, "ird", keep=keep, min_samples=4, progress=False)

    sel, again = run(), run()
    assert sel.selected() == sel.budget == resolve_budget(keep, total)
    assert all(torch.equal(sel.masks[n], again.masks[n]) for n in sel.masks)


@given(scores=tied_scores())
@settings(max_examples=15, deadline=None, database=None)
def test_jsdrift_starts_from_every_candidate(scores):
    model = Holder(scores)
    total = sum(t.numel() for t in scores.values())
    sel = gradsel.select(model, None, "jsdrift", source="train", progress=False)
    assert sel.selected() == sel.budget == total
    assert all(bool(m.all()) for m in sel.masks.values())
