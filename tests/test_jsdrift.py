"""jsdrift: scale-invariant drift, groups that stop changing freeze first, freezing is real, resume is exact."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.policies.jsdrift import build_groups, drift_table, js_distance, plot_drift

from . import models as M


class TwoBranch(nn.Module):
    """``a`` and ``mix`` see a constant input; ``b1``/``b2`` learn from the informative one.

    With two classes the residuals of the two logits are opposite, so the squared gradients of ``a`` and of
    ``mix``'s first two rows are a fixed vector times one per-sample scalar: their Fisher *distribution*
    cannot change during training. ``mix``'s rows 2 and 3 gate two different learned paths, so the balance
    between them (and their block's distribution) keeps moving.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.mix = nn.Linear(4, 4)
        self.b1 = nn.Linear(8, 32)
        self.b2 = nn.Linear(32, 2)
        self.c = nn.Linear(8, 2)

    def forward(self, x):
        xa, xb = x[:, :4], x[:, 4:]
        h = self.mix(xa)
        gated = self.b2(torch.tanh(self.b1(xb)) * torch.tanh(h[:, 2:3])) + self.c(xb) * torch.tanh(h[:, 3:4])
        return self.a(xa) + h[:, :2] + gated


def _data(n, g):
    xb = torch.randn(n, 8, generator=g)
    y = ((xb[:, 0] * xb[:, 1] + xb[:, 2]) > 0).long()
    xa = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(n, 4)
    return torch.cat([xa, xb], 1), y


def _run(steps, *, state=None, seed=0, **options):
    """Train TwoBranch with jsdrift; optionally resume from ``state`` (model, optimizer, handle, rng)."""
    torch.manual_seed(seed)
    model = TwoBranch()
    g = torch.Generator().manual_seed(seed)
    probe = [_data(64, torch.Generator().manual_seed(100))]
    opts = dict(interval=5, threshold=0.005, patience=2, warmup=10)
    opts.update(options)
    sel = gradsel.select(model, probe, "jsdrift", progress=False, **opts)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
    handle = sel.apply(model, opt)
    if state is not None:
        handle.load_state_dict(state["handle"])
    snapshots = {}
    for _ in range(steps):
        x, y = _data(32, g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        handle.step()
        snapshots[handle.steps] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, opt, handle, g, snapshots


# -- the distance ------------------------------------------------------------------------------------------

def _js_direct(p, q):
    p, q = [[v / sum(x) for v in x] for x in (p, q)]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, m) if x > 0)  # noqa: E731
    return math.sqrt(0.5 * kl(p) + 0.5 * kl(q))


def test_js_distance_properties_against_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p, q = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
        d = js_distance(p, q)
        assert d == pytest.approx(_js_direct(p.tolist(), q.tolist()), abs=1e-12)
        assert d == pytest.approx(js_distance(q, p), abs=1e-15)  # symmetric
        for c in (1e-12, 0.3, 7.0, 1e9):  # scale-invariant
            assert js_distance(p * c, q) == pytest.approx(d, abs=1e-12)
        assert 0.0 <= d <= 1.0
        assert js_distance(p, p.clone()) == 0.0
        assert js_distance(p, p * 5) < 1e-7  # equal after normalising (up to rounding, under a square root)
    assert js_distance(torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 3.0])) == pytest.approx(1.0)
    assert js_distance(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(
        _js_direct([0.5, 0.5], [1.0, 0.0]))


def test_row_blocks_and_auto_groups():
    shapes = {"enc.layer.0.w": (10, 3), "enc.layer.1.w": (4, 3), "head.bias": (2,)}
    blocks = build_groups(list(shapes), shapes, "tensor", blocks=3)
    assert [g.name for g in blocks[:3]] == ["enc.layer.0.w[0/3]", "enc.layer.0.w[1/3]", "enc.layer.0.w[2/3]"]
    assert sum(g.numel(shapes) for g in blocks) == 30 + 12 + 2
    auto = build_groups(list(shapes), shapes, "auto")
    assert [g.name for g in auto] == ["enc.layer.0", "enc.layer.1", "head"]
    with pytest.raises(GradselError, match="in two groups"):
        build_groups(list(shapes), shapes, {"x": ["enc.*"], "y": ["enc.layer.0"]})


# -- freezing ----------------------------------------------------------------------------------------------

def test_stable_groups_freeze_first_and_the_others_keep_training():
    model, opt, handle, _, snaps = _run(80, blocks=2)
    frozen = handle.controller.frozen
    assert {"a.weight[0/2]", "a.weight[1/2]", "a.bias[0/2]", "mix.weight[0/2]"} <= set(frozen)
    for active in ("b1.weight[0/2]", "b1.weight[1/2]", "b2.weight[0/2]", "mix.weight[1/2]"):
        assert active not in frozen
    assert min(frozen.values()) == 10  # right after warm-up
    last = max(snaps)
    # the active groups keep moving after the first freeze
    assert not torch.equal(snaps[last]["b1.weight"], snaps[20]["b1.weight"])
    assert not torch.equal(snaps[last]["mix.weight"][2:], snaps[20]["mix.weight"][2:])
    handle.remove()


def test_frozen_tensors_stop_requiring_grad_lose_state_and_never_move():
    model, opt, handle, g, snaps = _run(40, blocks=2)
    when = max(handle.controller.frozen[f"a.weight[{i}/2]"] for i in range(2))
    assert not model.a.weight.requires_grad and model.a.weight.grad is None
    assert model.a.weight not in opt.state and model.a.bias not in opt.state
    x, y = _data(32, g)
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.a.weight.grad is None  # autograd skipped it
    for step in range(when, max(snaps) + 1):
        assert torch.equal(snaps[step]["a.weight"], snaps[when]["a.weight"])
    # partly frozen: rows 0-1 of mix.weight frozen, rows 2-3 still trained
    assert model.mix.weight.requires_grad
    part = handle.controller.frozen["mix.weight[0/2]"]
    for step in range(part, max(snaps) + 1):
        assert torch.equal(snaps[step]["mix.weight"][:2], snaps[part]["mix.weight"][:2])
    assert not torch.equal(snaps[max(snaps)]["mix.weight"][2], snaps[part]["mix.weight"][2])
    assert not bool(handle.selection.masks["mix.weight"][:2].any()) and bool(handle.selection.masks["mix.weight"][2:].all())
    handle.remove()
    assert model.a.weight.requires_grad  # remove() gives plain training back


def test_training_gradient_source_freezes_the_same_stable_groups():
    _, _, handle, _, _ = _run(60, source="train")
    assert {"a.weight", "a.bias"} <= set(handle.controller.frozen)
    assert "b1.weight" not in handle.controller.frozen


def test_floor_limits_freezing():
    _, _, handle, _, _ = _run(60, threshold=10.0, floor=0.9)  # everything counts as stable
    assert handle.controller.trainable_share() >= 0.9
    assert 0 < len(handle.controller.frozen)


def test_relative_rule_freezes_the_outliers_in_stability():
    _, _, handle, _, _ = _run(60, rule="relative", lam=-0.5)
    assert {"a.weight", "a.bias"} <= set(handle.controller.frozen)
    assert "b1.weight" not in handle.controller.frozen


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run():
    full_model, _, full, _, _ = _run(60, blocks=2)
    model, opt, handle, g, _ = _run(25, blocks=2)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "handle": handle.state_dict(),
                           "rng": g.get_state()})
    handle.remove()
    resumed_model, _, resumed, _, _ = _run(35, state=state, blocks=2)
    assert resumed.controller.frozen == full.controller.frozen
    a, b = resumed.controller.history["smoothed"], full.controller.history["smoothed"]
    assert a.keys() == b.keys()
    for name in a:
        assert [s for s, _ in a[name]] == [s for s, _ in b[name]]
        assert [d for _, d in a[name]] == pytest.approx([d for _, d in b[name]], abs=1e-6)
    for (n, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_history_plot_and_table(tmp_path):
    _, _, handle, _, _ = _run(40)
    path = plot_drift(handle, tmp_path / "drift.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = drift_table(handle, markdown=True)
    assert "| a.weight |" in text and "| 10 |" in text and "active" in text
    # the history is saved with the selection (JSON in the safetensors metadata)
    back = gradsel.Selection.load(handle.selection.save(tmp_path / "sel.safetensors"))
    assert back.info["jsdrift"]["frozen"]["a.weight"] == 10
    assert not bool(back.masks["a.weight"].any())


def test_bad_options():
    with pytest.raises(GradselError, match="leave keep= out"):
        gradsel.select(TwoBranch(), [_data(8, torch.Generator())], "jsdrift", keep=0.5, progress=False)
    with pytest.raises(GradselError, match="source="):
        gradsel.select(TwoBranch(), [_data(8, torch.Generator())], "jsdrift", source="grads", progress=False)


# -- the floor: the training loop never runs out of parameters ----------------------------------------------

_W = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))


def _easy(steps, *, stop_when_done=False, **options):
    """``M.mlp`` on a linearly separable 3-class task with jsdrift's default options (plus ``options``).

    Returns the handle, the first step at which ``done`` was True, parameter snapshots per step and the
    jsdrift warnings. With ``stop_when_done`` the loop stops as the docs recommend.
    """
    model = M.mlp(0)
    g = torch.Generator().manual_seed(0)

    def batch(n=32):
        x = torch.randn(n, 6, generator=g)
        return x, (x @ _W).argmax(1)

    sel = gradsel.select(model, [batch()], "jsdrift", progress=False, **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = sel.apply(model, opt)
    done_at, snaps = None, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x, y = batch()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            handle.step()
            snaps[handle.steps] = {n: p.detach().clone() for n, p in model.named_parameters()}
            if handle.controller.done and done_at is None:
                done_at = handle.steps
            if stop_when_done and handle.controller.done:
                break
    jsdrift_warnings = [str(w.message) for w in caught if "jsdrift" in str(w.message)]
    return handle, done_at, snaps, jsdrift_warnings, (model, batch)


def test_floor_zero_freezes_everything_warns_once_and_reports_done():
    handle, done_at, _, warned, (model, batch) = _easy(400, stop_when_done=True, floor=0)
    c = handle.controller
    assert sorted(c.frozen) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    last = max(c.frozen.values())
    assert done_at == last == handle.steps  # done exactly when the last group froze, not before
    assert c.done and c.trainable_share() == 0.0 and c.trainable_groups() == []
    assert len(warned) == 1 and f"at step {last}" in warned[0] and "handle.done" in warned[0]
    assert "loss.backward() raises" in warned[0]
    # what the warning is about: a loop that did not stop would crash here
    with pytest.raises(RuntimeError, match="does not require grad"):
        nn.functional.cross_entropy(model(batch()[0]), batch()[1]).backward()
    handle.remove()


def test_default_floor_keeps_the_most_drifting_group_training_and_the_loop_alive():
    zero, zero_done, _, _, _ = _easy(400, stop_when_done=True, floor=0)
    last = max(zero.controller.frozen.values())
    kept = [n for n, s in zero.controller.frozen.items() if s == last]
    handle, done_at, snaps, warned, (model, batch) = _easy(last + 120)  # defaults: floor=1
    c = handle.controller
    assert handle.steps == last + 120 and warned == []  # backward never raised, nothing to warn about
    # the same run up to the last freeze; there the floor keeps the group the zero-floor run froze last
    assert c.frozen == {n: s for n, s in zero.controller.frozen.items() if s < last}
    assert c.trainable_groups() == kept
    assert 0 < c.trainable_share() < 1
    name = kept[0]
    assert not torch.equal(snaps[last + 120][name], snaps[last][name])  # and it keeps training
    assert done_at == zero_done == last  # done once every group met the rule, the floor holding the last one
    handle.remove()


@pytest.mark.parametrize("floor", [1, 3, 0.5])
def test_floor_keeps_the_groups_that_drift_most(floor):
    # threshold 10: every group is stable, so at step 10 all are ready and only the floor decides
    _, _, handle, _, _ = _run(12, threshold=10.0, floor=floor)
    c = handle.controller
    drift = {n: dict(map(tuple, s))[10] for n, s in c.history["smoothed"].items()}
    kept, frozen = c.trainable_groups(), set(c.frozen)
    assert set(kept) | frozen == set(drift) and set(c.frozen.values()) == {10}
    assert min(drift[n] for n in kept) >= max(drift[n] for n in frozen)
    if isinstance(floor, int):
        assert len(kept) == floor
    else:  # as few groups as the share allows: freezing the least drifting kept group would break it
        least = min(kept, key=drift.get)
        assert c.trainable_share() >= floor > (c.trainable_elements() - c.sizes[least]) / c.total
    assert c.done  # every group met the freeze rule; the floor holds the rest
    handle.remove()


def test_floor_zero_with_an_always_head_warns_that_only_the_head_trains():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, handle, g, _ = _run(12, threshold=10.0, floor=0, always="c.*")
    msgs = [str(w.message) for w in caught if "jsdrift" in str(w.message)]
    assert len(msgs) == 1 and "always= parameters still train" in msgs[0]
    assert handle.controller.done and handle.controller.trainable_share() == 0.0
    x, y = _data(8, g)
    nn.functional.cross_entropy(model(x), y).backward()  # the head still has a gradient
    assert model.c.weight.grad is not None
    handle.remove()


def test_budget_follows_the_masks_after_freezes_save_load_and_resume(tmp_path):
    model, opt, handle, g, _ = _run(40, blocks=2)
    sel, c = handle.selection, handle.controller
    assert 0 < sel.selected() < sel.total()
    assert sel.budget == sel.selected() == c.trainable_elements() == round(c.trainable_share() * sel.total())
    assert f"budget={sel.selected():,} of {sel.total():,}" in sel.summary()
    back = gradsel.Selection.load(sel.save(tmp_path / "sel.safetensors"))
    assert back.budget == back.selected() == sel.budget
    assert f"budget={sel.budget:,} of" in back.summary()
    # a handle restored from a checkpoint on a fresh selection gets the budget of the masks it restores
    state = copy.deepcopy(handle.state_dict())
    _, _, fresh, _, _ = _run(0, blocks=2)
    assert fresh.selection.budget == fresh.selection.total()
    fresh.load_state_dict(state)
    assert fresh.selection.budget == fresh.selection.selected() == sel.budget
    handle.remove()
    fresh.remove()


def test_resume_restores_the_floor_state():
    opts = dict(threshold=10.0, floor=2)
    full_model, _, full, _, full_snaps = _run(40, **opts)
    model, opt, handle, g, _ = _run(20, **opts)
    assert len(handle.controller.trainable_groups()) == 2 and handle.controller.done
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "handle": handle.state_dict(),
                           "rng": g.get_state()})
    handle.remove()
    resumed_model, _, resumed, _, snaps = _run(20, state=state, **opts)
    r, f = resumed.controller, full.controller
    assert r.frozen == f.frozen and r.trainable_groups() == f.trainable_groups() and r.done and f.done
    assert resumed.selection.budget == full.selection.budget == resumed.selection.selected()
    for name in r.trainable_groups():  # the groups the floor holds keep training after the resume
        assert not torch.equal(snaps[40][name], snaps[21][name])
        torch.testing.assert_close(snaps[40][name], full_snaps[40][name], rtol=0, atol=1e-6)


def test_applying_a_selection_again_keeps_its_frozen_groups():
    model, _, handle, _, _ = _run(40, blocks=2)
    frozen = dict(handle.controller.frozen)
    sel = handle.selection
    handle.remove()
    again = sel.apply(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    assert again.controller.frozen == frozen and sel.budget == sel.selected() == again.controller.trainable_elements()
    assert not model.a.weight.requires_grad
    again.remove()
    sel.masks["b1.weight"][0, 0] = False  # an edit jsdrift cannot represent
    with pytest.raises(GradselError, match="partly False"):
        sel.apply(model, torch.optim.AdamW(model.parameters(), lr=0.01))


@pytest.mark.parametrize("floor, match", [(-1, "negative"), (1.5, "outside"), (True, "number of groups"),
                                          ("1", "number of groups"), (99, "only 10 groups")])
def test_bad_floor(floor, match):
    with pytest.raises(GradselError, match=match):
        gradsel.select(TwoBranch(), [_data(8, torch.Generator())], "jsdrift", floor=floor, progress=False)


# -- network order, the cheap signal, presets ----------------------------------------------------------------

FORWARD = ["mix", "b1", "b2", "c", "a"]  # TwoBranch's forward order; it registers a, mix, b1, b2, c


def test_network_order_is_the_forward_order_and_frozen_groups_form_a_prefix():
    # threshold 10: every group is stable at step 10, so only the order and the floor decide
    _, _, handle, _, _ = _run(12, order="network", threshold=10.0, floor=2)
    c = handle.controller
    assert c.network_order() == [f"{m}.{p}" for m in FORWARD for p in ("weight", "bias")]
    assert set(c.frozen) == set(c.network_order()[:-2])  # the prefix; the floor keeps the last two (a.*)
    handle.remove()
    # the same run in any order keeps the two that drift most instead, which are not a.*
    _, _, anyway, _, _ = _run(12, threshold=10.0, floor=2)
    assert set(anyway.controller.trainable_groups()) != {"a.weight", "a.bias"}
    anyway.remove()
    # with a real rule: a.* is stable (it froze at step 10 in any order) but sits after drifting groups
    _, _, handle, _, _ = _run(60, order="network")
    order, frozen = handle.controller.network_order(), handle.controller.frozen
    assert "a.weight" not in frozen and "b1.weight" not in frozen
    assert set(order[: len(frozen)]) == set(frozen)
    handle.remove()


def test_a_frozen_prefix_leaves_the_backward_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    data = lambda: (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))  # noqa: E731
    sel = gradsel.select(model, [data()], "jsdrift", order="network", interval=2, threshold=10.0, floor=2,
                         patience=1, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    needs = {}
    outputs = {}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.requires_grad))
             for i in (0, 2, 4)]
    with sel.apply(model, opt) as handle:
        events = []
        handle.controller.on_freeze.append(events.append)
        for _ in range(4):
            x, y = data()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            event = handle.step()
            needs.setdefault("first", handle.controller.needs_rewrap)
            if event is not None:
                assert event == events[-1]
        assert events[0]["step"] == 2 and events[0]["tensors"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert handle.controller.needs_rewrap and needs["first"] is False
        x, y = data()
        nn.functional.cross_entropy(model(x), y).backward()
        # layers 0 and 2 froze: autograd records nothing for them, so backward stops at layer 4's input
        assert outputs == {0: False, 2: False, 4: True}
        assert model[0].weight.grad is None
    for h in hooks:
        h.remove()


def test_train_window_squares_only_the_last_steps_before_a_measurement():
    _, _, all_steps, _, _ = _run(4, source="train", interval=5)
    _, _, last_one, _, _ = _run(4, source="train", interval=5, window=1)
    assert all(bool(b.any()) for b in all_steps.state_dict()["controller"]["buffers"].values())
    assert not any(bool(b.any()) for b in last_one.state_dict()["controller"]["buffers"].values())  # step 5 not yet run
    assert all_steps.controller.state_dict()["counted"] == 4 and last_one.controller.state_dict()["counted"] == 0
    all_steps.remove()
    last_one.remove()


def test_history_records_what_the_signal_cost(tmp_path):
    _, _, probe, _, _ = _run(20)
    _, _, train, _, _ = _run(20, source="train")
    hp, ht = probe.controller.history, train.controller.history
    assert hp["probe_time"] > 0 and hp["signal_time"] >= hp["probe_time"]
    assert ht["probe_time"] == 0 and ht["signal_time"] > 0
    back = gradsel.Selection.load(probe.selection.save(tmp_path / "sel.safetensors"))
    assert back.info["jsdrift"]["probe_time"] == pytest.approx(hp["probe_time"])
    probe.remove()
    train.remove()


def test_preset_fast_and_explicit_overrides():
    from gradsel.policies.jsdrift import JSDrift

    fast = JSDrift(preset="fast").options
    assert (fast["source"], fast["order"], fast["rule"], fast["groups"]) == ("train", "network", "plateau", "auto")
    assert fast["preset"] == "fast"
    assert JSDrift(preset="fast", source="probe", interval=4).options["source"] == "probe"
    assert JSDrift(preset="fast", interval=2).options["window"] == 2  # the window never exceeds the interval
    assert JSDrift().options["order"] == "any" and JSDrift().options["source"] == "probe"  # defaults unchanged


def test_preset_fast_freezes_a_prefix_when_the_drift_stops_falling():
    # TwoBranch's tensors are all below the preset's min_group (they would form one group): keep them apart
    _, _, handle, _, _ = _run(90, preset="fast", interval=5, warmup=0, min_group=0)
    c = handle.controller
    assert len(c.frozen) >= 2 and c.trainable_groups()  # froze something, and the floor kept the rest alive
    order = c.network_order()
    assert order == FORWARD and set(order[: len(c.frozen)]) == set(c.frozen)
    tol, patience, interval = c.o["tol"], c.o["patience"], c.o["interval"]
    for name, step in c.frozen.items():  # each froze after `patience` measurements without a 5% fall
        series = [d for s, d in c.history["smoothed"][name] if s <= step]
        assert len(series) >= patience + 1
        assert all(b >= (1 - tol) * a for a, b in zip(series[-patience - 1:], series[-patience:]))
    # recheck: one group a measurement at most, and the next only after `patience` fresh stable measurements
    steps = [c.frozen[n] for n in order[: len(c.frozen)]]
    assert all(b - a >= patience * interval for a, b in zip(steps, steps[1:]))
    for prev, name in zip(order, order[1: len(c.frozen)]):  # stable at each measurement since prev froze
        series = dict((s, d) for s, d in c.history["smoothed"][name])
        seen = [s for s in series if c.frozen[prev] < s <= c.frozen[name]]
        assert len(seen) >= patience
    handle.remove()


def test_without_recheck_a_stable_prefix_freezes_at_one_measurement():
    _, _, once, _, _ = _run(90, preset="fast", interval=5, warmup=0, min_group=0, recheck=False)
    _, _, paced, _, _ = _run(90, preset="fast", interval=5, warmup=0, min_group=0)
    steps = sorted(once.controller.frozen.values())
    assert len(steps) >= 2 and len(set(steps)) < len(steps)  # several groups at one measurement
    assert len(set(paced.controller.frozen.values())) == len(paced.controller.frozen)
    assert min(steps) == min(paced.controller.frozen.values())  # the first freeze is the same
    once.remove()
    paced.remove()


def test_min_group_merges_small_groups_into_their_neighbour():
    shapes = {"stem.conv.weight": (64, 3, 7, 7), "stem.bn.weight": (64,), "stem.bn.bias": (64,),
              "layer.0.w": (64, 64), "layer.1.w": (64, 64), "head.w": (2, 64), "head.b": (2,)}
    plain = build_groups(list(shapes), shapes, "tensor")
    merged = build_groups(list(shapes), shapes, "tensor", min_size=1024)
    assert [g.name for g in merged] == ["stem.conv.weight", "layer.0.w", "layer.1.w"]
    assert [n for n, _ in merged[0].parts] == ["stem.conv.weight", "stem.bn.weight", "stem.bn.bias"]
    assert [n for n, _ in merged[-1].parts] == ["layer.1.w", "head.w", "head.b"]  # the small head joins its predecessor
    assert sum(g.numel(shapes) for g in merged) == sum(g.numel(shapes) for g in plain)
    first_small = {"bn.weight": (8,), "conv.weight": (64, 64)}
    assert [(g.name, [n for n, _ in g.parts]) for g in build_groups(list(first_small), first_small, "auto", min_size=100)] \
        == [("conv", ["bn.weight", "conv.weight"])]  # nothing before it: it joins the next
    user = {"x": ["stem.bn.*"]}
    assert [g.name for g in build_groups(list(shapes), shapes, user, min_size=1024)][0] == "x"  # a dict's groups stay
    with pytest.raises(GradselError, match="min_group"):
        build_groups(list(shapes), shapes, "auto", min_size=-1)


# -- sample= ------------------------------------------------------------------------------------------------

def test_sample_positions_are_a_fixed_uniform_subset_of_each_group():
    from gradsel.policies.jsdrift import sample_positions

    shapes = {"w": (40, 30), "b": (40,), "v": (5, 3)}
    groups = build_groups(["w", "b"], shapes, {"big": ["w", "b"]}) + \
        build_groups(["v"], shapes, "tensor", blocks=2)
    index, parts = sample_positions(groups, shapes, 64, seed=0)
    again, _ = sample_positions(groups, shapes, 64, seed=0)
    other, _ = sample_positions(groups, shapes, 64, seed=1)
    assert all(torch.equal(index[n], again[n]) for n in index)  # fixed: the same in every process / on resume
    assert not torch.equal(index["w"], other["w"])
    # the big group: at most 64 distinct elements, spread over both tensors, each a valid flat index
    picked = [(n, int(i)) for n, pos in parts["big"] for i in index[n][pos]]
    assert len(picked) == 64 and len(set(picked)) == len(picked)
    assert all(0 <= i < math.prod(shapes[n]) for n, i in picked)
    # small groups (row blocks of v) keep every element, each block its own rows
    rows = {g.name: sorted(int(i) for n, pos in parts[g.name] for i in index[n][pos]) for g in groups[1:]}
    assert rows == {"v[0/2]": list(range(0, 6)), "v[1/2]": list(range(6, 15))}
    # uniform over the group's elements: over many seeds, w (1200 of 1240 elements) gets about 1200/1240
    counts = [sum(len(pos) for n, pos in sample_positions(groups, shapes, 64, seed=s)[1]["big"] if n == "w")
              for s in range(40)]
    totals = [sum(len(pos) for _, pos in sample_positions(groups, shapes, 64, seed=s)[1]["big"]) for s in range(40)]
    assert sum(counts) / sum(totals) == pytest.approx(1200 / 1240, abs=0.02)


def test_sampled_probe_signal_is_the_exact_distribution_restricted_to_the_sample():
    from gradsel.policies.jsdrift import _normalise

    torch.manual_seed(0)
    model = TwoBranch().double()
    probe = [tuple(t.double() if t.is_floating_point() else t for t in _data(64, torch.Generator().manual_seed(100)))]
    sel = gradsel.select(model, probe, "jsdrift", progress=False, sample=20, probe_samples=64)
    handle = sel.apply(model, torch.optim.SGD(model.parameters(), lr=0.1))
    c = handle.controller
    exact = gradsel.fisher(model, probe, progress=False)
    for g in c.groups:
        want = torch.cat([exact[n].reshape(-1)[c._index[n][pos]] for n, pos in c._parts[g.name]])
        assert c.prev[g.name].numel() == min(20, g.numel(c.shapes))
        torch.testing.assert_close(c.prev[g.name].double(), _normalise(want), rtol=1e-6, atol=1e-9)
    handle.remove()


def test_sampled_training_buffers_hold_the_squares_of_the_sampled_gradients():
    torch.manual_seed(0)
    model = TwoBranch()
    sel = gradsel.select(model, [_data(8, torch.Generator())], "jsdrift", progress=False, source="train",
                         interval=5, sample=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = sel.apply(model, opt)
    c = handle.controller
    want = {n: torch.zeros(c._index[n].numel(), dtype=torch.float64) for n in c._index}
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = _data(32, g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.double().reshape(-1)[c._index[n]] ** 2
        opt.step()
        handle.step()
    assert c._buffers["b1.weight"].numel() <= 16 < model.b1.weight.numel()  # only the sample is kept
    for n, b in c._buffers.items():
        torch.testing.assert_close(b.double(), want[n], rtol=1e-5, atol=1e-12)
    handle.remove()


@pytest.mark.parametrize("sample", ["all", 12])
def test_sampled_signal_makes_the_exact_signals_freeze_decisions(sample):
    # the constant-input branch cannot drift whatever elements are measured; the learning branch drifts in any
    # sample of its elements: the same groups freeze, at the same step, as with every element
    _, _, handle, _, _ = _run(80, blocks=2, sample=sample)
    _, _, exact, _, _ = _run(80, blocks=2)
    frozen = handle.controller.frozen
    assert {"a.weight[0/2]", "a.weight[1/2]", "a.bias[0/2]", "mix.weight[0/2]"} <= set(frozen)
    for active in ("b1.weight[0/2]", "b1.weight[1/2]", "b2.weight[0/2]", "mix.weight[1/2]"):
        assert active not in frozen
    stable = {"a.weight[0/2]", "a.weight[1/2]", "mix.weight[0/2]"}
    assert {n: frozen[n] for n in stable} == {n: exact.controller.frozen[n] for n in stable}
    if sample != "all":
        assert handle.controller.prev and max(v.numel() for v in handle.controller.prev.values()) <= 12
    handle.remove()
    exact.remove()


def test_a_checkpoint_with_other_sample_options_is_refused():
    _, _, a, _, _ = _run(3, source="train", sample=8)
    state = a.state_dict()
    a.remove()
    _, _, b, _, _ = _run(0, source="train", sample=12)
    with pytest.raises(GradselError, match="sample="):
        b.load_state_dict(state)
    b.remove()


@pytest.mark.parametrize("options", [dict(preset="fast", interval=5, min_group=0), dict(order="network", source="train",
                                                                           window=2, threshold=0.3),
                                     dict(preset="fast", interval=5, min_group=0, sample=10, patience=1)])
def test_resume_reproduces_the_run_with_network_order_and_training_gradients(options):
    full_model, _, full, _, _ = _run(60, **options)
    model, opt, handle, g, _ = _run(23, **options)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "handle": handle.state_dict(),
                           "rng": g.get_state()})
    handle.remove()
    resumed_model, _, resumed, _, _ = _run(37, state=state, **options)
    assert resumed.controller.frozen == full.controller.frozen and full.controller.frozen
    assert resumed.controller.network_order() == full.controller.network_order()
    for name, series in full.controller.history["smoothed"].items():
        assert [d for _, d in resumed.controller.history["smoothed"][name]] == pytest.approx(
            [d for _, d in series], abs=1e-6)


@pytest.mark.parametrize("options, match", [(dict(preset="slow"), "preset="), (dict(order="backward"), "order="),
                                            (dict(rule="median"), "rule="), (dict(tol=1.5), "tol must"),
                                            (dict(window=0), "window must"), (dict(sample=1), "sample must"),
                                            (dict(sample="some"), "sample must"), (dict(recheck=1), "recheck must"),
                                            (dict(min_group=-3), "min_group")])
def test_bad_new_options(options, match):
    with pytest.raises(GradselError, match=match):
        gradsel.select(TwoBranch(), [_data(8, torch.Generator())], "jsdrift", progress=False, **options)
