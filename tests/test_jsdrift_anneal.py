"""jsdrift ``anneal=``: a picked group's updates shrink along a cosine for ``anneal`` steps, then it freezes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.policies.jsdrift import drift_table, plot_drift

from .test_jsdrift import TwoBranch, _data, _run


def _factor(j: int, k: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * j / (k + 1)))


def test_anneal_scales_each_update_of_the_picked_groups_along_the_cosine_then_freezes_them(tmp_path):
    """Every step, a plain AdamW from the same state and gradients gives the update the handle must scale
    (float64, so that the comparison of the two updates is exact to rounding)."""
    k = 4
    torch.manual_seed(0)
    model = TwoBranch().double()
    g = torch.Generator().manual_seed(0)
    x, y = _data(64, torch.Generator().manual_seed(100))
    probe = [(x.double(), y)]
    # threshold 10: every group is stable at the measurements of steps 5 and 10, so at step 10 (the warm-up's
    # end) the rule picks every group but the one the floor keeps
    sel = gradsel.select(model, probe, "jsdrift", progress=False, interval=5, threshold=10.0, patience=2,
                         warmup=10, anneal=k)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    handle = sel.apply(model, opt)
    c = handle.controller
    names = [n for n, _ in model.named_parameters()]
    seen_scaled = set()
    for step in range(1, 21):
        x, y = _data(32, g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        ref_params = [p.detach().clone() for p in model.parameters()]
        for r, p in zip(ref_params, model.parameters()):
            r.grad = None if p.grad is None else p.grad.clone()
        ref_opt = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.05)
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        before = [p.detach().clone() for p in model.parameters()]
        annealing = dict(c.annealing)
        frozen = {n for n in names if not sel.masks[n].any()}
        opt.step()
        ref_opt.step()
        handle.step()
        for n, p, b, r in zip(names, model.parameters(), before, ref_params):
            if n in frozen:
                torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, msg=n)  # frozen: never moves
                continue
            start = annealing.get(n)  # groups="tensor": a group is its tensor
            factor = 1.0 if start is None else _factor(step - start, k)
            if start is not None:
                seen_scaled.add((n, step))
            torch.testing.assert_close(p.detach() - b, factor * (r.detach() - b), rtol=1e-9, atol=1e-14,
                                       msg=lambda m, n=n, step=step, factor=factor: f"{n} step {step} x{factor}: {m}")
        if 10 <= step < 10 + k:
            assert c.annealing and not c.frozen and not handle.done
            assert c.trainable_elements() == c.total  # still trained, so still counted
        if step == 10 + k:
            assert not c.annealing
    picked = set(c.history["anneal_from"])
    assert len(picked) == len(c.groups) - 1  # the floor keeps one
    assert set(c.frozen) == picked and set(c.frozen.values()) == {10 + k}
    assert set(c.history["anneal_from"].values()) == {10}
    assert {s for _, s in seen_scaled} == set(range(11, 11 + k))  # the k optimizer steps after the pick
    assert not model.a.weight.requires_grad  # a whole tensor left training at the freeze
    assert "annealed from step" in drift_table(handle)
    assert plot_drift(handle, str(tmp_path / "drift.png")) and (tmp_path / "drift.png").stat().st_size > 0
    handle.remove()


def test_an_annealing_group_counts_as_gone_for_network_order_and_recheck():
    """The decisions are those of the run without anneal (each tier is picked while the one before it still
    anneals); every freeze comes ``anneal`` steps after its pick."""
    opts = dict(order="network", threshold=10.0, floor=2, recheck=True)
    _, _, plain, _, _ = _run(45, **opts)
    _, _, handle, _, _ = _run(45, anneal=20, **opts)
    c = handle.controller
    picks = plain.controller.frozen
    assert len(picks) >= 3 and len(set(picks.values())) == len(picks)  # one tier per measurement, 10 steps apart
    assert c.history["anneal_from"] == picks
    assert c.frozen == {g: s + 20 for g, s in picks.items() if s + 20 <= 45}
    second = c.network_order()[1]
    assert picks[second] < c.frozen[c.network_order()[0]]  # picked while the first tier still annealed
    plain.remove()
    handle.remove()


def test_resume_in_the_middle_of_an_anneal_reproduces_the_uninterrupted_run():
    opts = dict(blocks=2, threshold=10.0, anneal=8)
    full_model, _, full, _, _ = _run(30, **opts)
    model, opt, handle, g, _ = _run(13, **opts)
    assert handle.controller.annealing  # the checkpoint falls inside the anneal (steps 11 to 18)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "handle": handle.state_dict(),
                           "rng": g.get_state()})
    handle.remove()
    resumed_model, _, resumed, _, _ = _run(17, state=state, **opts)
    assert resumed.controller.frozen == full.controller.frozen and resumed.controller.frozen
    assert resumed.controller.history["anneal_from"] == full.controller.history["anneal_from"]
    for (n, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("anneal", [-1, 1.5, True, "10"])
def test_bad_anneal_is_refused(anneal):
    with pytest.raises(GradselError, match="anneal must be"):
        gradsel.select(TwoBranch(), [_data(8, torch.Generator().manual_seed(0))], "jsdrift", progress=False,
                       anneal=anneal)


def test_anneal_without_the_optimizer_is_refused():
    model = TwoBranch()
    sel = gradsel.select(model, [_data(8, torch.Generator().manual_seed(0))], "jsdrift", progress=False, anneal=5)
    with pytest.raises(GradselError, match="needs the optimizer"):
        sel.apply(model)
