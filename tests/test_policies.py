"""One contract for every registered policy, plus what each built-in must select."""

from __future__ import annotations

import pytest
import torch

import gradsel
from gradsel import GradselError
from gradsel.policies import top_k

from . import models as M
from .ranking import stable_top_k


# A policy registered here, from "user code", goes through the same matrix as the built-ins.
@gradsel.register_policy("test_magnitude")
class Magnitude(gradsel.Policy):
    """Largest weights by absolute value: a data-free user policy in a few lines."""

    def select(self, ctx):
        return top_k({n: ctx.model.get_parameter(n).abs() for n in ctx.candidates}, ctx.k)


STATIC = [p for p in gradsel.list_policies() if not gradsel.policies.get_policy(p).progressive]


def _select(policy, keep, seed=0, **kw):
    model = M.mlp()
    return model, gradsel.select(model, M.mlp_batch(n=16), policy, keep=keep, seed=seed, progress=False, **kw)


def test_the_user_policy_is_in_the_matrix():
    assert "test_magnitude" in STATIC
    assert {"fish", "random", "reverse"} <= set(STATIC)


@pytest.mark.parametrize("policy", STATIC)
@pytest.mark.parametrize("keep", [0.1, 0.5, 37, 1.0])
def test_contract_shapes_budget_determinism(policy, keep):
    model, sel = _select(policy, keep)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    k = keep if isinstance(keep, int) else round(keep * total)
    assert set(sel.masks) == set(params)
    for name, mask in sel.masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
    assert sum(int(m.sum()) for m in sel.masks.values()) == k == sel.selected() == sel.budget
    _, again = _select(policy, keep)
    assert all(torch.equal(sel.masks[n], again.masks[n]) for n in sel.masks)


@pytest.mark.parametrize("policy", STATIC)
def test_contract_save_load_round_trip(policy, tmp_path):
    model, sel = _select(policy, 0.2, budget="per_tensor") if policy in ("fish", "reverse") else _select(policy, 0.2)
    path = sel.save(tmp_path / "sel.safetensors")
    back = gradsel.Selection.load(path, model)
    assert back.policy == policy and back.options == sel.options and back.budget == sel.budget
    assert back.candidates == sel.candidates and back.shapes == sel.shapes
    assert all(torch.equal(back.masks[n], sel.masks[n]) for n in sel.masks)


def test_fish_is_top_k_of_the_reference_fisher_and_reverse_bottom_k():
    model = M.mlp().double()
    batch = tuple(x.double() if x.is_floating_point() else x for x in M.mlp_batch(n=16))
    ref = gradsel.fisher_loop(model, batch, progress=False)
    flat = ref.flat()
    assert len(torch.unique(flat)) == len(flat)  # no ties in this data
    k = 50
    order = torch.argsort(flat, descending=True)
    for policy, chosen in (("fish", order[:k]), ("reverse", order[-k:])):
        sel = gradsel.select(model, batch, policy, keep=k, progress=False)
        got = torch.cat([sel.masks[n].reshape(-1) for n in ref])
        expected = torch.zeros_like(got)
        expected[chosen] = True
        assert torch.equal(got, expected), policy


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [0, 1, 7, 23, 40])
def test_top_k_within_masks_matches_a_stable_sort_with_ties(largest, k):
    # coarse integer scores give many ties; the reference ranks (score, position) with a stable sort
    gen = torch.Generator().manual_seed(k)
    scores = {"a": torch.randint(0, 4, (5, 6), generator=gen).float(),
              "b": torch.randint(0, 4, (30,), generator=gen).double()}
    within = {n: torch.rand(t.shape, generator=gen) > 0.3 for n, t in scores.items()}
    k = min(k, sum(int(m.sum()) for m in within.values()))
    expected = stable_top_k(scores, k, largest=largest, within=within)
    got = top_k(scores, k, largest=largest, within=within)
    assert torch.equal(torch.cat([got[n].reshape(-1) for n in scores]), expected)
    assert [got[n].shape for n in scores] == [t.shape for t in scores.values()]


def test_fish_per_tensor_budget_splits_exactly():
    model, sel = _select("fish", 30, budget="per_tensor")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    counts = {n: int(m.sum()) for n, m in sel.masks.items()}
    assert sum(counts.values()) == 30
    for n in sizes:  # each tensor gets its proportional share, rounded
        assert abs(counts[n] - 30 * sizes[n] / sum(sizes.values())) < 1


def test_random_differs_across_seeds():
    _, a = _select("random", 0.3, seed=0)
    _, b = _select("random", 0.3, seed=1)
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_lora_at_initialisation_gets_exactly_k_not_everything():
    # B = 0 at initialisation makes every lora_A gradient zero: half the scores tie at 0. A threshold
    # test (score >= k-th largest) would keep every element; the budget must stay exact.
    model = M.bert_lora(train_b=False)
    est = gradsel.fisher(model, M.bert_batch(), progress=False)
    assert all(float(est[n].abs().sum()) == 0 for n in est if "lora_A" in n)
    total = est.numel()
    k = int(0.75 * total)
    sel = gradsel.select(model, M.bert_batch(), "fish", keep=k, fisher=est, progress=False)
    assert sel.selected() == k < total
    assert all(bool(sel.masks[n].all()) for n in sel.candidates if "lora_B" in n)
    # the tie among A entries is broken by position: the earliest A tensors are filled first
    a_counts = [int(sel.masks[n].sum()) for n in sel.candidates if "lora_A" in n]
    assert a_counts == sorted(a_counts, reverse=True)


def test_always_parameters_train_in_full_and_are_reported_apart():
    model, sel = _select("fish", 10, always="3.*")
    assert sel.always == ["3.weight", "3.bias"]
    assert all(bool(sel.masks[n].all()) for n in sel.always)
    assert sel.selected() == 10 and "3.weight" not in sel.candidates
    assert sel.trainable() == 10 + 16 * 3 + 3
    text = sel.summary()
    assert "3.weight (always)" in text and "trainable (candidates + always)" in text


def test_summary_counts_come_from_the_masks():
    model, sel = _select("random", 0.25)
    sel.masks["0.weight"][:] = True  # counts must follow the masks, not the budget
    rows = {r["group"]: r for r in sel.rows()}
    assert rows["0.weight"]["selected"] == 96 and rows["0.weight"]["share"] == 1.0
    md = sel.summary(markdown=True)
    assert "| group | selected | total | share |" in md
    assert f"| candidates | {sel.selected():,} | {sel.total():,} |" in md


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep,match", [(0.0, "outside"), (-0.1, "outside"), (1.5, "outside"),
                                        (10_000, "outside 1..163"), (True, "fraction"), (0, "outside")])
def test_bad_keep(keep, match):
    with pytest.raises(GradselError, match=match):
        _select("fish", keep)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(GradselError, match="unknown policy .fishy.; registered: fish, "):
        _select("fishy", 0.1)


def test_always_matching_nothing():
    with pytest.raises(GradselError, match="always='head.*' matches no parameter"):
        _select("fish", 0.1, always="head.*")


def test_registering_a_name_twice_raises():
    with pytest.raises(GradselError, match="registered already"):
        gradsel.register_policy("fish")(Magnitude)


def test_policy_that_breaks_the_budget_is_caught():
    @gradsel.register_policy("test_overshoot")
    def overshoot(ctx):
        return {n: torch.ones(s, dtype=torch.bool) for n, s in ctx.shapes.items()}

    try:
        with pytest.raises(GradselError, match="selected 163 elements, the budget is 16"):
            _select("test_overshoot", 0.1)
    finally:
        gradsel.policies.unregister_policy("test_overshoot")


def test_list_policies_wildcard():
    assert gradsel.list_policies("*fish*") == ["fish"]
    assert gradsel.list_policies("re*") == ["reverse"]


PROGRESSIVE = [p for p in gradsel.list_policies() if gradsel.policies.get_policy(p).progressive]


@pytest.mark.parametrize("policy", PROGRESSIVE)
def test_contract_progressive_policies(policy, tmp_path):
    # progressive policies start from every candidate trainable and change the masks through handle.step()
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(n=16), policy, seed=3, progress=False)
    params = dict(model.named_parameters())
    assert set(sel.masks) == set(params)
    for name, mask in sel.masks.items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape and bool(mask.all())
    assert sel.selected() == sel.total() == sel.budget
    back = gradsel.Selection.load(sel.save(tmp_path / "p.safetensors"), model)
    assert back.policy == policy and back.options == sel.options
    assert all(torch.equal(back.masks[n], sel.masks[n]) for n in sel.masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sel.apply(model, opt) as handle:
        for _ in range(3):
            handle.step()
        assert handle.state_dict()["steps"] == 3


def test_matrix_covers_the_progressive_builtin():
    assert "jsdrift" in PROGRESSIVE
