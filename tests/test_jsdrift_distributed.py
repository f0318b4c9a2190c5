"""jsdrift under torch.distributed: 2 processes on gloo at 127.0.0.1, against one process with the same global batches.

Each rank trains a DDP-wrapped chain on its half of every global batch (and holds its half of the probe set).
The drift statistics are reduced across ranks, so both ranks freeze the same groups at the same steps as one
process that sees both halves (its gradient is the mean of the two halves' gradients, as DDP's is); after a
freeze the wrapper is rebuilt (``gradsel.distributed.rewrap_if_needed``) and the bytes DDP all-reduces per
step fall to the trainable tensors' size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gradsel
from gradsel import distributed as gd
from tests.dist_utils import gloo_rank, spawn_ranks

TIMEOUT = 120  # seconds for the spawned pair (a loaded 2-core machine; the pair takes ~10-20 s)
STEPS = 24
CASES = {
    # per-sample Fisher on each rank's half of the probe set, summed across ranks by gradsel.fisher
    "probe": dict(source="probe", interval=3, threshold=0.12, patience=1, order="network",
                  probe_samples=8),
    # each rank's squared local gradients, summed across ranks at each measurement (reduce_fisher)
    "train": dict(source="train", interval=3, window=2, rule="plateau", tol=0.05, patience=1, order="network"),
}


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        out.append((x, (x @ w).argmax(1)))
    return out


def _probe():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (16,), generator=g)


def _half(batch, part: int):
    return tuple(t[part * (len(t) // 2):(part + 1) * (len(t) // 2)] for t in batch)


def _result(model, handle, events, per_step_bytes=None) -> dict:
    c = handle.controller
    return {"frozen": dict(c.frozen), "events": events, "smoothed": {k: list(v) for k, v in c.history["smoothed"].items()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}, "bytes": per_step_bytes,
            "trainable_bytes": [], "share": c.trainable_share()}


# -- the spawned side ---------------------------------------------------------------------------------------------

def work(rank: int, world: int) -> dict:
    DDP = nn.parallel.DistributedDataParallel
    out = {}
    for case, options in CASES.items():
        model = _chain()
        probe = _half(_probe(), rank)
        sel = gradsel.select(model, [probe], "jsdrift", progress=False, **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        handle = sel.apply(model, opt)  # before wrapping: DDP registers what requires grad now
        ddp = DDP(model)
        counts = gd.count_allreduce(ddp)
        per_step, trainable, events = [], [], []
        for batch in _batches():
            x, y = _half(batch, rank)
            before = counts["bytes"]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            per_step.append(counts["bytes"] - before)
            trainable.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
            opt.step()
            event = handle.step()
            if event is not None:
                events.append([event["step"], sorted(event["groups"])])
            new = gd.rewrap_if_needed(ddp, handle)
            if new is not ddp:
                ddp, counts = new, gd.count_allreduce(new)
        out[case] = _result(model, handle, events, per_step)
        out[case]["trainable_bytes"] = trainable
        handle.remove()
    return out


def _entry(rank: int, world: int, port: int, out: str) -> None:
    with gloo_rank(rank, world, port, Path(out) / f"rank{rank}.err", TIMEOUT):
        torch.save(work(rank, world), Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jsdrift_ddp")
    spawn_ranks(_entry, 2, str(tmp), out=tmp, timeout=TIMEOUT, errors="rank*.err")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


# -- the reference: one process, both halves of every batch ------------------------------------------------------

def _one_process(options: dict) -> dict:
    model = _chain()
    if "probe_samples" in options:  # probe_samples is per rank: the ranks' probe sets together are twice that
        options = dict(options, probe_samples=2 * options["probe_samples"])
    sel = gradsel.select(model, [_probe()], "jsdrift", progress=False, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    handle = sel.apply(model, opt)
    events = []
    for batch in _batches():
        opt.zero_grad(set_to_none=True)
        halves = []
        for part in range(2):  # each half's gradient on its own (the train source squares each, as each rank does)
            for p in model.parameters():
                p.grad = None
            nn.functional.cross_entropy(model(_half(batch, part)[0]), _half(batch, part)[1]).backward()
            halves.append({p: p.grad for p in model.parameters() if p.grad is not None})
        for p in halves[0]:
            p.grad = halves[0][p] / 2 + halves[1][p] / 2  # DDP: each rank's gradient divided by 2, then summed
        opt.step()
        event = handle.step()
        if event is not None:
            events.append([event["step"], sorted(event["groups"])])
    out = _result(model, handle, events)
    handle.remove()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_freeze_steps_on_both_ranks_and_as_one_process(runs, case, one_thread):
    r0, r1 = runs[0][case], runs[1][case]
    ref = _one_process(CASES[case])
    assert ref["events"], "the reference run froze nothing: the case tests nothing"
    assert 0 < ref["share"] < 1
    assert r0["frozen"] == r1["frozen"] == ref["frozen"]
    assert r0["events"] == r1["events"] == ref["events"]
    # network order: what froze is a prefix of the chain (layer 0 first)
    names = [n for n, _ in _chain().named_parameters()]
    frozen = [n for n in names if n in ref["frozen"]]
    assert frozen == names[: len(frozen)]
    # the reduced statistics equal the one-process ones (a rank's own half alone would give other drifts);
    # the train source accumulates its squares in float32
    tol = 1e-9 if case == "probe" else 1e-6
    for name, series in ref["smoothed"].items():
        for got in (r0, r1):
            assert [s for s, _ in got["smoothed"][name]] == [s for s, _ in series]
            assert [d for _, d in got["smoothed"][name]] == pytest.approx([d for _, d in series], abs=tol)
    for n, p in ref["params"].items():
        torch.testing.assert_close(r0["params"][n], p, rtol=0, atol=1e-10, msg=n)
        assert torch.equal(r0["params"][n], r1["params"][n])  # replicas identical


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_all_reduced_drop_after_a_freeze(runs, case):
    r = runs[0][case]
    first = r["events"][0][0]  # the step whose handle.step() froze; the re-wrap takes effect from the next one
    full = r["trainable_bytes"][0]
    assert r["bytes"][:first] == [full] * first  # every tensor all-reduced, 8 bytes an element (float64)
    after = r["bytes"][first:]
    assert after and max(after) < full
    # from then on DDP all-reduces exactly the tensors that still train, step by step
    assert after == r["trainable_bytes"][first:]
