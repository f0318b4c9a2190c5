"""ird: the samples it keeps, its masks against a plain reference, evaluate, memory, history."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradsel
from gradsel import GradselError
from gradsel.policies.ird import plan, plot_rounds, rounds_table

from . import models as M


def _mse(outputs, batch):
    return ((outputs.squeeze(-1) - batch[1]) ** 2).sum()


def _split(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _reference_ird(model, batches, k, *, loss=None, min_samples=16, max_rounds=None):
    """IRD written plainly: every per-sample gradient held in memory (batch-of-one loop, float64), ranks by
    a stable sort (ties: earlier first). Per round: (sample positions, element count, candidate, range)."""
    params = [p for p in model.parameters()]
    model.eval()  # as gradsel.fisher: dropout off
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            out = model(x[i:i + 1])
            value = loss(out, (x[i:i + 1], y[i:i + 1])) if loss else nn.functional.cross_entropy(out, y[i:i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]).double())
    sq = torch.stack(rows).square()

    def top(values, n):
        out = torch.zeros(len(values), dtype=torch.bool)
        out[torch.argsort(values, descending=True, stable=True)[:n]] = True
        return out

    samples, elements = torch.arange(len(sq)), torch.ones(sq.shape[1], dtype=torch.bool)
    rounds = []
    while True:
        f = sq[samples].mean(0)
        scores = torch.where(elements, f, torch.tensor(-math.inf, dtype=f.dtype))
        rounds.append((samples.tolist(), int(elements.sum()), top(scores, k), elements))
        size = int(elements.sum())
        next_size = max(k, math.ceil(size / 2))
        if next_size == k or len(samples) <= min_samples or len(rounds) == max_rounds:
            return rounds
        elements = top(scores, next_size)
        contributions = sq[samples][:, elements].sum(1)
        samples = samples[top(contributions, max(min_samples, math.ceil(len(samples) / 2)))]


def _flat(masks, names):
    return torch.cat([masks[n].reshape(-1) for n in names])


def _mlp64():
    model = M.mlp().double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    return model, _split(x, y, 16)


# -- what it keeps ------------------------------------------------------------------------------------------

def test_keeps_the_informative_samples_and_ends_on_their_reference_fisher():
    # y = w·x with w = 0 and a squared loss: sample i's gradient is -2·y_i·x_i, so its Fisher contribution on
    # any element set P is 4·y_i²·Σ_{j∈P} x_ij², known in advance. 16 informative samples (|y| = 3, features
    # only on the first 64 inputs) are scattered among 48 noise samples (|y| = 0.3, features everywhere).
    g = torch.Generator().manual_seed(0)
    n, d = 64, 256
    informative = torch.randperm(n, generator=g)[:16].sort().values
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.3 * torch.sign(torch.randn(n, generator=g, dtype=torch.float64))
    x[informative, 64:] = 0
    y[informative] *= 10
    model = nn.Linear(d, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    data = _split(x, y, 16)
    k = 8

    sel = gradsel.select(model, data, "ird", keep=k, loss=_mse, min_samples=16, progress=False)

    contribution = 4 * y**2 * x.square().sum(1)  # each sample's contribution over all elements
    assert sel.info["sample_index"] == informative.tolist()
    assert set(sel.info["sample_index"]) == set(torch.topk(contribution, 16).indices.tolist())
    assert [(r["samples"], r["elements"]) for r in sel.info["rounds"]] == [(64, 256), (32, 128), (16, 64)]
    ref = gradsel.fisher_loop(model, data, loss=_mse, samples=informative, progress=False)
    assert ref.num_samples == 16
    expected = torch.zeros(d, dtype=torch.bool)
    expected[torch.argsort(ref["weight"].reshape(-1), descending=True, stable=True)[:k]] = True
    assert torch.equal(sel.masks["weight"].reshape(-1), expected)
    assert int(expected[:64].sum()) == k  # all in the informative block


@pytest.mark.parametrize("max_rounds", [None, 3])
def test_every_round_matches_a_plain_reference(max_rounds):
    # a generic model where pruned elements may outrank kept ones on later samples: each round's samples,
    # range and candidate must equal the plain in-memory implementation's
    model, data = _mlp64()
    names = [n for n, _ in model.named_parameters()]
    k = 10
    seen = []
    sel = gradsel.select(model, data, "ird", keep=k, min_samples=4, max_rounds=max_rounds, progress=False,
                         evaluate=lambda masks: seen.append(_flat(masks, names)) or 0.0)
    ref = _reference_ird(model, data, k, min_samples=4, max_rounds=max_rounds)
    got = sel.info["rounds"]
    assert len(got) == len(ref) == (5 if max_rounds is None else 3)
    for r, (samples, elements, _, _) in zip(got, ref):
        assert r["sample_index"] == samples and r["samples"] == len(samples) and r["elements"] == elements
    for mask, (_, _, expected, _) in zip(seen, ref):
        assert torch.equal(mask, expected)
    assert torch.equal(_flat(sel.masks, names), ref[-1][2]) and sel.info["chosen_round"] == len(ref)
    assert [r["chosen"] for r in got] == [False] * (len(got) - 1) + [True]


def test_last_round_is_the_top_k_within_the_final_range_not_over_all_elements():
    # documents the reading: the last candidate is the top-k of the final samples' Fisher *within the range*
    # kept by earlier rounds; on this model an element pruned earlier outranks it on the final samples
    model, data = _mlp64()
    sel = gradsel.select(model, data, "ird", keep=10, min_samples=4, progress=False)
    names = [n for n, _ in model.named_parameters()]
    final = torch.tensor(sel.info["sample_index"])
    ref = gradsel.fisher_loop(model, data, samples=final, progress=False).flat()
    unrestricted = torch.zeros_like(ref, dtype=torch.bool)
    unrestricted[torch.argsort(ref, descending=True, stable=True)[:10]] = True
    got = _flat(sel.masks, names)
    assert not torch.equal(got, unrestricted)
    final_range = _reference_ird(model, data, 10, min_samples=4)[-1][3]
    within = torch.zeros_like(got)
    within[torch.argsort(ref.masked_fill(~final_range, -math.inf), descending=True, stable=True)[:10]] = True
    assert torch.equal(got, within)


# -- evaluate and history -----------------------------------------------------------------------------------

def test_evaluate_picks_the_round_it_prefers():
    model, data = _mlp64()
    names = [n for n, _ in model.named_parameters()]
    seen = []

    def evaluate(masks):
        seen.append(_flat(masks, names))
        return 1.0 if len(seen) == 2 else -float(len(seen))

    sel = gradsel.select(model, data, "ird", keep=10, min_samples=4, evaluate=evaluate, progress=False)
    assert len(seen) == 5 and not torch.equal(seen[1], seen[-1])
    assert torch.equal(_flat(sel.masks, names), seen[1]) and sel.selected() == 10
    assert sel.info["chosen_round"] == 2
    assert [r["score"] for r in sel.info["rounds"]] == [-1.0, 1.0, -3.0, -4.0, -5.0]
    assert [r["chosen"] for r in sel.info["rounds"]] == [False, True, False, False, False]
    assert sel.info["sample_index"] == sel.info["rounds"][1]["sample_index"]


def test_evaluate_ties_go_to_the_later_round_and_bad_scores_raise():
    model, data = _mlp64()
    sel = gradsel.select(model, data, "ird", keep=10, min_samples=4, evaluate=lambda m: 0.5, progress=False)
    assert sel.info["chosen_round"] == len(sel.info["rounds"])
    with pytest.raises(GradselError, match="NaN for round 1"):
        gradsel.select(model, data, "ird", keep=10, evaluate=lambda m: float("nan"), progress=False)
    with pytest.raises(GradselError, match="must return a float"):
        gradsel.select(model, data, "ird", keep=10, evaluate=lambda m: "good", progress=False)


def test_history_saves_loads_and_plots(tmp_path):
    model, data = _mlp64()
    sel = gradsel.select(model, data, "ird", keep=10, min_samples=4, evaluate=lambda m: 0.0, progress=False)
    back = gradsel.Selection.load(sel.save(tmp_path / "ird.safetensors"), model)
    assert back.info["rounds"] == sel.info["rounds"] and back.info["chosen_round"] == sel.info["chosen_round"]
    assert isinstance(back.options["evaluate"], str) and back.options["min_samples"] == 4
    assert all(torch.equal(back.masks[n], sel.masks[n]) for n in sel.masks)
    with back.apply(model, torch.optim.SGD(model.parameters(), lr=0.1)) as handle:  # policy rebuilt from options
        handle.step()
    png = plot_rounds(back, tmp_path / "rounds.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = rounds_table(sel, markdown=True)
    assert "| round | samples | elements | score | chosen |" in text and "| 5 | 4 | 11 | 0 | yes |" in text


def test_cost_matches_the_plan_and_a_given_fisher_saves_the_first_pass():
    model, data = _mlp64()
    sel = gradsel.select(model, data, "ird", keep=10, min_samples=4, progress=False)
    p = plan(64, sel.total(), 10, min_samples=4)
    assert [(r["samples"], r["elements"]) for r in sel.info["rounds"]] == \
        [(r["samples"], r["elements"]) for r in p["rounds"]]
    assert sel.info["sample_gradients"] == p["sample_gradients"] == 2 * (64 + 32 + 16 + 8 + 4) - 4
    assert sel.info["fisher_passes"] == p["fisher_passes"] < 4

    est = gradsel.fisher(model, data, progress=False)
    again = gradsel.select(model, data, "ird", keep=10, min_samples=4, fisher=est, progress=False)
    assert again.info["reused_fisher"] and again.info["sample_gradients"] == p["sample_gradients"] - 64
    assert all(torch.equal(again.masks[n], sel.masks[n]) for n in sel.masks)
    other = gradsel.fisher(model, _mlp64_other(), progress=False)
    with pytest.raises(GradselError, match="another Fisher"):
        gradsel.select(model, data, "ird", keep=10, min_samples=4, fisher=other, progress=False)


def _mlp64_other():
    g = torch.Generator().manual_seed(99)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    return _split(x, y, 16)


def test_num_samples_limits_the_first_range_and_options_are_checked():
    model, data = _mlp64()
    sel = gradsel.select(model, data, "ird", keep=10, num_samples=40, min_samples=4, progress=False)
    assert sel.info["rounds"][0]["sample_index"] == list(range(40))
    assert [r["samples"] for r in sel.info["rounds"]] == [40, 20, 10, 5, 4]
    for bad, match in [({"min_samples": 0}, "min_samples"), ({"max_rounds": 0}, "max_rounds"),
                       ({"sample_fraction": 1.0}, "sample_fraction"), ({"param_fraction": 0}, "param_fraction"),
                       ({"evaluate": 3}, "evaluate")]:
        with pytest.raises(GradselError, match=match):
            gradsel.select(model, data, "ird", keep=10, progress=False, **bad)


def test_data_that_changes_between_reads_is_refused():
    model, data = _mlp64()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    dataset = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(GradselError, match="shuffle=False"):
        gradsel.select(model, torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True), "ird", keep=10,
                       progress=False)
    with pytest.raises(GradselError, match="one-shot iterator"):
        gradsel.select(model, iter(data), "ird", keep=10, progress=False)
    with pytest.raises(GradselError, match="pass data"):
        gradsel.select(model, None, "ird", keep=10, fisher=gradsel.fisher(model, data, progress=False),
                       progress=False)

    class Reshuffled:  # a different order on each read, not a DataLoader: caught by the second pass
        def __init__(self):
            self.reads = 0

        def __iter__(self):
            order = torch.randperm(64, generator=torch.Generator().manual_seed(self.reads))
            self.reads += 1
            return iter(_split(x[order], y[order], 16))

    with pytest.raises(GradselError, match="same order"):
        gradsel.select(model, Reshuffled(), "ird", keep=10, min_samples=4, progress=False)
    ok = gradsel.select(model, torch.utils.data.DataLoader(dataset, batch_size=16), "ird", keep=10, min_samples=4,
                        progress=False)
    assert ok.info["rounds"][-1]["samples"] == 4


def test_deterministic_over_several_rounds():
    model, data = _mlp64()
    a = gradsel.select(model, data, "ird", keep=0.1, min_samples=4, progress=False)
    b = gradsel.select(model, data, "ird", keep=0.1, min_samples=4, progress=False)
    assert len(a.info["rounds"]) > 1 and a.info["rounds"] == b.info["rounds"]
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_transformer_and_always():
    model = M.bert()
    data = M.bert_batch(n=16)  # one HF dict batch, read five times (three Fisher passes, two contribution passes)
    sel = gradsel.select(model, data, "ird", keep=0.01, always="classifier.*", min_samples=4, progress=False)
    assert sel.selected() == sel.budget and all(bool(sel.masks[n].all()) for n in sel.always)
    assert [r["samples"] for r in sel.info["rounds"]] == [16, 8, 4]
    assert not any(n.startswith("classifier") for n in sel.candidates)


# -- memory -------------------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any aten op returns (under vmap: the physical batch)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_memory_stays_below_all_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.Tanh(), nn.Linear(2048, 10))
    elements = sum(p.numel() for p in model.parameters())
    assert elements >= 1_000_000
    g = torch.Generator().manual_seed(0)
    n = 256
    data = _split(torch.randn(n, 512, generator=g), torch.randint(0, 10, (n,), generator=g), 32)
    every = n * elements * 4  # every per-sample gradient in float32: 1.1 GB
    with LargestTensor() as mode:
        sel = gradsel.select(model, data, "ird", keep=0.001, chunk_size=16, progress=False)
    assert sel.selected() == sel.budget == round(0.001 * elements)
    assert [r["samples"] for r in sel.info["rounds"]] == [256, 128, 64, 32, 16]
    # the largest thing held is one chunk of 16 per-sample gradients of the largest weight (67 MB; this shows
    # that the mode sees what vmap materialises), 1/16 of storing them all
    largest_weight = max(p.numel() for p in model.parameters())
    assert 16 * largest_weight * 4 <= mode.largest <= every // 16
