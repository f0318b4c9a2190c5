"""gradsel under torch.distributed: 2 processes on gloo at 127.0.0.1, compared with one process in float64.

Each test spawns 2 workers (start method spawn), each bounded in time; a worker runs several cases and
writes what it got to tmp_path; the parent computes the single-process reference and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsel
from gradsel import distributed as gd
from tests import models as M
from tests.dist_utils import free_port, gloo_rank, spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds per spawned pair (a loaded 2-core machine; each pair takes ~10-30 s)




def _entry(rank: int, world: int, port: int, work: str, out: str) -> None:
    with gloo_rank(rank, world, port, Path(out) / f"{work}_{rank}.err", TIMEOUT):
        torch.save(globals()[work](rank, world), Path(out) / f"{work}_{rank}.pt")


def _spawn(work: str, tmp_path: Path, world: int = 2) -> list:
    """Run ``work(rank, world)`` in ``world`` spawned processes; their results, by rank."""
    spawn_ranks(_entry, world, work, str(tmp_path), out=tmp_path, timeout=TIMEOUT, errors=f"{work}_*.err")
    return [torch.load(tmp_path / f"{work}_{r}.pt", weights_only=False) for r in range(world)]


def _double(batch):
    if isinstance(batch, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return tuple(x.double() if x.is_floating_point() else x for x in batch)


def _pack(f: gradsel.Fisher) -> dict:
    return {"scores": {n: t.clone() for n, t in f.items()}, "num_samples": f.num_samples,
            "per_sample": f.per_sample, "sample_index": f.sample_index}


def _mlp_data(n: int = 13):
    return _double(M.mlp_batch(n=n, seed=3))


def _rank_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous shards, rank after rank (the layout gradsel assumes without a DistributedSampler)."""
    cut = [n * r // world for r in range(world + 1)]
    return slice(cut[rank], cut[rank + 1])


def _take(batch, sl):
    if isinstance(batch, dict):
        return {k: v[sl] for k, v in batch.items()}
    return tuple(x[sl] for x in batch)


def _sampler_loader(dataset, **kwargs):
    return DataLoader(dataset, batch_size=3, sampler=DistributedSampler(dataset, shuffle=True, seed=1), **kwargs)


# -- workers ----------------------------------------------------------------------------------------------------

def work_fisher(rank: int, world: int) -> dict:
    x, y = _mlp_data()
    model = M.mlp().double()
    sl = _rank_slice(len(y), rank, world)
    shard = [(x[sl][i:i + 3], y[sl][i:i + 3]) for i in range(0, len(y[sl]), 3)]
    loader = _sampler_loader(TensorDataset(x, y))  # 13 samples over 2 ranks: one padding duplicate
    out = {
        "shards": _pack(gradsel.fisher(model, shard, progress=False, per_sample=True)),
        "shards_mc": _pack(gradsel.fisher(model, shard, progress=False, kind="mc", seed=5, per_sample=True)),
        "sampler": _pack(gradsel.fisher(model, loader, progress=False, per_sample=True)),
        "sampler_mc": _pack(gradsel.fisher(model, loader, progress=False, kind="mc", seed=5)),
        "sampler_subset": _pack(gradsel.fisher(model, loader, progress=False, samples=[0, 4, 5, 11, 12],
                                               per_sample=True)),
        "sampler_num": _pack(gradsel.fisher(model, loader, progress=False, num_samples=9)),
        "ddp": _pack(gradsel.fisher(nn.parallel.DistributedDataParallel(model), loader, progress=False)),
        "local_indices": list(loader.sampler),
    }
    # buckets: 3 float64 tensors of 40 / 24 / 8 bytes (rank+1 each) under a 64-byte cap: 2 all-reduces
    sums = {n: torch.full((k,), float(rank + 1), dtype=torch.float64) for n, k in (("a", 5), ("b", 3), ("c", 1))}
    total, _, _, stats = gd.reduce_fisher(sums, 2 + rank, bucket_bytes=64)
    out["buckets"] = {"sums": sums, "total": total, "stats": stats}
    return out


def _row_training(model: nn.Module, x, y, ddp: bool, steps: int = 8, sparse: bool = True) -> dict:
    """A row selection (the same on every rank: one process's Fisher), Selection.apply with AdamW before any
    wrapping (it freezes the tensors with nothing selected), then the row-sparse backward, under DDP or not."""
    from gradsel.rowsparse import row_sparse

    # 90 elements: 6 of the first layer's 16 rows (one partly) and all of the last's
    sel = gradsel.select(M.mlp().double(), [(x, y)], "fish", keep=90, granularity="row", progress=False)
    model.eval()  # (its Dropout would draw other masks on each rank than one process draws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = sel.apply(model, opt)
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    rows = row_sparse(net, sel) if sparse else None
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        handle.step()
    layers = dict(rows.layers) if rows else {}
    if rows:
        rows.remove()
    handle.remove()
    return {"end": {n: p.detach().clone() for n, p in model.named_parameters()}, "layers": layers}


def work_row_training(rank: int, world: int) -> dict:
    x, y = _mlp_data(n=12)
    sl = _rank_slice(12, rank, world)
    return _row_training(M.mlp().double(), x[sl], y[sl], ddp=True)


def work_models(rank: int, world: int) -> dict:
    bert, batch = M.bert().double(), M.bert_batch(n=6)
    out = {"bert": _pack(gradsel.fisher(bert, [_take(batch, _rank_slice(6, rank, world))], progress=False))}
    unet, batch = M.unet().double(), _double(M.unet_batch(n=4, size=32))
    out["unet"] = _pack(gradsel.fisher(unet, [_take(batch, _rank_slice(4, rank, world))], progress=False))
    return out


def work_core(rank: int, world: int) -> dict:
    """One spawned pair for the fast tests: starting processes costs more than the cases themselves."""
    return {"fisher": work_fisher(rank, world), "select": work_select(rank, world), "ddp": work_ddp(rank, world)}


def work_select(rank: int, world: int) -> dict:
    x, y = _mlp_data()
    model = M.mlp().double()
    loader = _sampler_loader(TensorDataset(x, y))
    out = {}
    for policy in ("fish", "random", "reverse"):
        out[policy] = gradsel.select(model, loader, policy, keep=20, progress=False, seed=3).masks
    ird = gradsel.select(model, loader, "ird", keep=10, min_samples=4, progress=False)
    out["ird"] = ird.masks
    out["ird_rounds"] = [r["sample_index"] for r in ird.info["rounds"]]
    masks = {n: m.clone() for n, m in out["fish"].items()}
    if rank == 1:
        masks["3.weight"].view(-1)[0] ^= True  # this rank disagrees, at the second tensor of the MLP
    try:
        gd.check_masks_agree(masks)
        out["differ_error"] = None
    except gradsel.GradselError as exc:
        out["differ_error"] = str(exc)
    gd.check_masks_agree(out["fish"])  # the same masks pass
    return out


def _ddp_steps(ddp, opt, handle, rank, masks, steps=5) -> float:
    """Train; return the largest gradient seen at a masked entry after DDP's all-reduce."""
    g = torch.Generator().manual_seed(100 + rank)  # each rank trains on its own data
    params = dict(ddp.module.named_parameters())
    leak = 0.0
    for _ in range(steps):
        x, t = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), t).backward()
        for n, m in masks.items():
            if params[n].grad is not None:
                leak = max([leak] + params[n].grad[~m].abs().tolist())
        opt.step()
        if handle is not None:
            handle.step()
    return leak


def _partial_selection(model, frozen: bool):
    """A fixed element mask on 0.weight (and, with ``frozen``, 0.bias fully frozen); 3.* trained in full."""
    g = torch.Generator().manual_seed(7)
    masks = {"0.weight": torch.rand(model[0].weight.shape, generator=g) < 0.3,
             "3.weight": torch.ones(model[3].weight.shape, dtype=torch.bool),
             "3.bias": torch.ones(model[3].bias.shape, dtype=torch.bool)}
    cand = ["0.weight"]
    if frozen:
        masks["0.bias"] = torch.zeros(model[0].bias.shape, dtype=torch.bool)
        cand.append("0.bias")
    return gradsel.Selection(masks, policy="random", candidates=cand, always=["3.weight", "3.bias"])


def work_ddp(rank: int, world: int) -> dict:
    DDP = nn.parallel.DistributedDataParallel
    out = {}
    for case in ("before", "after_rewrap", "after_unused", "after_partial"):
        model = M.mlp().double()
        sel = _partial_selection(model, frozen=case != "after_partial")
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        if case == "before":
            handle = sel.apply(model, opt)
            ddp = DDP(model)
        elif case == "after_rewrap":
            ddp = DDP(model)
            try:
                sel.apply(ddp, opt)
                out["frozen_error"] = None
            except gradsel.GradselError as exc:
                out["frozen_error"] = str(exc)
            handle = sel.apply(ddp.module, opt)
            ddp = gd.rewrap(ddp)
        elif case == "after_unused":
            ddp = DDP(model, find_unused_parameters=True)
            handle = sel.apply(ddp, opt)
        else:
            ddp = DDP(model)
            handle = sel.apply(ddp, opt)
        leak = _ddp_steps(ddp, opt, handle, rank, sel.masks)
        out[case] = {"leak": leak, "start": start, "end": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "masks": sel.masks}
        handle.remove()

    # SparseAdamW under DDP: each rank takes its half of the same global batches
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    sel = gradsel.select(model, None, "random", keep=30, always="2.*", seed=4, progress=False)
    opt = sel.optimizer(model, lr=1e-2, weight_decay=0.1)
    ddp = DDP(model)
    g = torch.Generator().manual_seed(9)
    for _ in range(50):
        x, t = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        sl = _rank_slice(8, rank, world)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x[sl]), t[sl]).backward()
        opt.step()
    out["sparse"] = {"end": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "state": {n: opt.state[p]["exp_avg"].numel() for n, p in model.named_parameters()
                               if p in opt.state}, "masks": sel.masks}
    return out


# -- tests ------------------------------------------------------------------------------------------------------

def _assert_fisher(got: dict, ref: gradsel.Fisher, *, rtol: float = 1e-10):
    assert got["num_samples"] == ref.num_samples
    assert sorted(got["scores"]) == sorted(ref)
    largest = max(float(t.abs().max()) for t in ref.values())  # relative to the model's largest score: some
    for n in ref:  # true scores are 0 up to rounding (BERT's key bias cannot change the softmax)
        torch.testing.assert_close(got["scores"][n], ref[n], rtol=rtol, atol=rtol * largest, msg=n)
    if got["per_sample"] is not None:
        torch.testing.assert_close(got["per_sample"], ref.per_sample, rtol=rtol, atol=0)
    torch.testing.assert_close(got["sample_index"], ref.sample_index.cpu())


@pytest.fixture(scope="module")
def core_runs(tmp_path_factory):
    return _spawn("work_core", tmp_path_factory.mktemp("core"))


@pytest.fixture
def fisher_runs(core_runs):
    return [r["fisher"] for r in core_runs]


@pytest.fixture
def select_runs(core_runs):
    return [r["select"] for r in core_runs]


@pytest.fixture
def ddp_runs(core_runs):
    return [r["ddp"] for r in core_runs]


def test_fisher_equals_one_process(fisher_runs, one_thread):
    """MLP on contiguous shards (per_sample, mc) and under an uneven DistributedSampler: one process's Fisher."""
    x, y = _mlp_data()
    model = M.mlp().double()
    ref = gradsel.fisher_loop(model, (x, y), progress=False, per_sample=True)
    ref_mc = gradsel.fisher_loop(model, (x, y), progress=False, kind="mc", seed=5, per_sample=True)
    for run in fisher_runs:
        assert all(run[k]["per_sample"] is not None for k in ("shards", "shards_mc", "sampler"))
        _assert_fisher(run["shards"], ref)
        _assert_fisher(run["shards_mc"], ref_mc)
        _assert_fisher(run["sampler"], ref)  # 13 samples, not 14: the sampler's padding duplicate is dropped
        _assert_fisher(run["sampler_mc"], ref_mc)
        _assert_fisher(run["ddp"], ref)  # a DDP wrapper: the same names, no "module." prefix
    # the sampler really shuffled and padded: each rank got 7 positions, 14 in all for 13 samples
    seen = fisher_runs[0]["local_indices"] + fisher_runs[1]["local_indices"]
    assert len(seen) == 14 and len(set(seen)) == 13 and seen[:7] != list(range(0, 14, 2))
    # mc labels are not the data's: the two Fishers differ
    assert not torch.allclose(ref_mc["3.weight"], ref["3.weight"])
    # every rank holds the same result, bit for bit
    for key in ("shards", "sampler", "sampler_mc"):
        for n, t in fisher_runs[0][key]["scores"].items():
            assert torch.equal(t, fisher_runs[1][key]["scores"][n])


def test_reduce_fisher_buckets(fisher_runs):
    for run in fisher_runs:
        b = run["buckets"]
        assert b["total"] == 5 and all(bool((t == 3.0).all()) for t in b["sums"].values())
        # one all-gather of the counts, then two buckets (40 + 24 bytes; 8 bytes): not one per tensor
        assert b["stats"] == {"collectives": 3, "bytes": 16 + 64 + 8}


def test_fisher_global_samples_and_num_samples(fisher_runs, one_thread):
    """samples= and num_samples= name global positions (dataset indices under a DistributedSampler)."""
    x, y = _mlp_data()
    model = M.mlp().double()
    ref = gradsel.fisher_loop(model, (x, y), progress=False, samples=[0, 4, 5, 11, 12], per_sample=True)
    ref_num = gradsel.fisher_loop(model, (x, y), progress=False, num_samples=9)
    for run in fisher_runs:
        assert run["sampler_subset"]["per_sample"] is not None
        _assert_fisher(run["sampler_subset"], ref)
        _assert_fisher(run["sampler_num"], ref_num)


@pytest.mark.slow
def test_fisher_bert_and_unet(tmp_path, one_thread):
    fisher_runs = _spawn("work_models", tmp_path)
    bert, batch = M.bert().double(), M.bert_batch(n=6)
    ref = gradsel.fisher_loop(bert, batch, progress=False)
    unet, ubatch = M.unet().double(), _double(M.unet_batch(n=4, size=32))
    uref = gradsel.fisher(unet, ubatch, progress=False)  # vmap against the loop is tests/test_fisher.py's job
    for run in fisher_runs:
        _assert_fisher(run["bert"], ref)
        _assert_fisher(run["unet"], uref)


@pytest.mark.parametrize("policy", ["fish", "random", "reverse", "ird"])
def test_masks_identical_and_equal_to_one_process(select_runs, policy, one_thread):
    x, y = _mlp_data()
    model = M.mlp().double()
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    opts = {"min_samples": 4} if policy == "ird" else {}
    ref = gradsel.select(model, loader, policy, keep=10 if policy == "ird" else 20, progress=False,
                         seed=0 if policy == "ird" else 3, **opts)
    for run in select_runs:
        for n, m in ref.masks.items():
            assert torch.equal(run[policy][n], m), (policy, n)
    if policy == "ird":  # the sample steps ranked the global samples
        assert select_runs[0]["ird_rounds"] == [r["sample_index"] for r in ref.info["rounds"]]
        assert len(ref.info["rounds"]) >= 2


def test_mask_check_names_the_differing_parameter(select_runs):
    for run in select_runs:
        assert run["differ_error"] is not None and "'3.weight'" in run["differ_error"]
        assert "rank(s) [1]" in run["differ_error"]


@pytest.mark.parametrize("case", ["before", "after_rewrap", "after_unused", "after_partial"])
def test_ddp_apply_keeps_masked_fixed_and_replicas_equal(ddp_runs, case):
    r0, r1 = ddp_runs[0][case], ddp_runs[1][case]
    assert r0["leak"] == r1["leak"] == 0.0  # no gradient reaches a masked entry through the all-reduce
    for n in r0["end"]:
        assert torch.equal(r0["end"][n], r1["end"][n]), (case, n)  # replicas identical, bit for bit
    for n, m in r0["masks"].items():
        assert torch.equal(r0["end"][n][~m], r0["start"][n][~m]), (case, n)  # masked entries never moved
        if bool(m.any()):
            assert not torch.equal(r0["end"][n][m], r0["start"][n][m]), (case, n)  # the selection trained


def test_ddp_apply_after_wrapping_with_frozen_tensor_raises(ddp_runs):
    msg = ddp_runs[0]["frozen_error"]
    assert msg is not None and "'0.bias'" in msg and "rewrap" in msg and "find_unused_parameters" in msg


def test_sparse_adamw_under_ddp_equals_dense_adamw_one_process(ddp_runs, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    sel = gradsel.select(model, None, "random", keep=30, always="2.*", seed=4, progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(9)
    with sel.apply(model, opt) as handle:
        for _ in range(50):
            x, t = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
            handle.step()
    for run in ddp_runs:
        assert all(torch.equal(run["sparse"]["masks"][n], m) for n, m in sel.masks.items())
        for n, p in model.named_parameters():
            torch.testing.assert_close(run["sparse"]["end"][n], p.detach(), rtol=0, atol=1e-6)
        # state only for the selected elements (the 0.* tensors) and the dense always= head
        assert run["sparse"]["state"] == {n: int(m.sum()) for n, m in sel.masks.items() if bool(m.any())}


def test_row_sparse_training_under_ddp_equals_one_process(tmp_path, one_thread):
    """The row-sparse backward's dense gradients (zeros outside the touched rows) go through DDP's all-reduce:
    the replicas stay equal and follow one process's dense masked AdamW over the whole batch."""
    runs = _spawn("work_row_training", tmp_path)
    x, y = _mlp_data(n=12)
    ref = _row_training(M.mlp().double(), x, y, ddp=False)
    assert runs[0]["layers"] == ref["layers"] == {"0": (6, 16)}  # the first layer's other 10 rows skipped
    start = M.mlp().double().state_dict()
    for n, p in ref["end"].items():
        assert not torch.equal(p, start[n]), n  # every tensor trained
        for run in runs:
            torch.testing.assert_close(run["end"][n], p, rtol=0, atol=1e-10, msg=n)


def test_single_process_needs_no_group():
    assert gd.default_group() is None
    with pytest.raises(gradsel.GradselError, match="not initialised"):
        gd.default_group(object())
    gd.check_masks_agree({"w": torch.ones(2, dtype=torch.bool)})  # nothing to compare with: no error
    total, rows, index, stats = gd.reduce_fisher({"w": torch.ones(2)}, 3)
    assert total == 3 and stats == {"collectives": 0, "bytes": 0}


def test_rewrap_needs_ddp():
    with pytest.raises(gradsel.GradselError, match="DistributedDataParallel"):
        gd.rewrap(nn.Linear(2, 2))


@pytest.mark.slow
def test_torchrun_example(tmp_path):
    """examples/torchrun_fisher.py under torch.distributed.run with 2 processes on gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    out = tmp_path / "sel.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "examples" / "torchrun_fisher.py"), "--out", str(out), "--steps", "3"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "masks agree on 2 ranks" in proc.stdout
    sel = gradsel.Selection.load(out)
    assert sel.selected() == sel.budget > 0
