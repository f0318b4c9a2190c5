"""jsdrift: scale-invariant drift, groups that stop changing freeze first, freezing is real, resume is exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.policies.jsdrift import build_groups, drift_table, js_distance, plot_drift


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
