"""gradsel on FSDP2 (fully_shard) models: 2 processes on gloo at 127.0.0.1, compared with one process in float64.

The workers shard a model with fully_shard (submodules and root, uneven dim-0 shards), estimate the Fisher,
select, train with SparseAdamW and save; the parent compares each rank's shards with one process over all
the data.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsel
from gradsel import fsdp as gf
from gradsel.delta import SparseDelta
from gradsel.policies import top_k as plain_top_k
from tests import models as M
from tests.dist_utils import gloo_rank, spawn_ranks

TIMEOUT = 150  # seconds per spawned pair (a loaded 2-core machine)


def _entry(rank: int, world: int, port: int, work: str, out: str) -> None:
    with gloo_rank(rank, world, port, Path(out) / f"{work}_{rank}.err", TIMEOUT):
        os.environ["GRADSEL_TEST_OUT"] = out
        torch.save(globals()[work](rank, world, Path(out)), Path(out) / f"{work}_{rank}.pt")


def _spawn(work: str, tmp_path: Path, world: int = 2) -> list:
    """Run ``work(rank, world, tmp_path)`` in ``world`` spawned processes; their results, by rank."""
    spawn_ranks(_entry, world, work, str(tmp_path), out=tmp_path, timeout=TIMEOUT, errors=f"{work}_*.err")
    return [torch.load(tmp_path / f"{work}_{r}.pt", weights_only=False) for r in range(world)]


# -- models and data (the same in the workers and the parent) ------------------------------------------------------

def _mlp(seed: int = 0) -> nn.Sequential:
    """Dim-0 sizes 7, 5, 1, 3: uneven shards on 2 ranks (4+3, 3+2, 1+0: rank 1 holds none of 5.*, 2+1 rows)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 3)).double()


def _shard(model: nn.Module, units: list[nn.Module]) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in units:
        fully_shard(m)
    fully_shard(model)
    return model


def _sharded_mlp(seed: int = 0) -> nn.Sequential:
    model = _mlp(seed)
    return _shard(model, [model[0], model[3]])  # units: [0], [3], and the root (LayerNorm, [5], [7])


def _data(n: int = 13):
    x, y = M.mlp_batch(n=n, seed=3)
    return x.double(), y


def _loader(dataset, distributed: bool = True):
    if not distributed:
        return DataLoader(dataset, batch_size=3)
    # 13 samples on 2 ranks: 7 each with one padding duplicate; 3 batches on one rank, 2 on the other once the
    # duplicate is dropped, so the ranks run different numbers of chunks of their own
    return DataLoader(dataset, batch_size=3, sampler=DistributedSampler(dataset, shuffle=True, seed=1))


def _local(model: nn.Module) -> dict:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _pack(f) -> dict:
    return {"scores": {n: t.clone() for n, t in f.items()}, "num_samples": f.num_samples, "per_sample": f.per_sample,
            "sample_index": f.sample_index, "layouts": dict(f.layouts), "stats": dict(f.stats),
            "sharded": getattr(f, "sharded", False)}


def _tie_scores() -> dict:
    """Few distinct values (many ties), float64 and float32 tensors, a tensor of zeros."""
    g = torch.Generator().manual_seed(11)
    return {"a": torch.randint(0, 3, (7, 6), generator=g).double(), "b": torch.randint(0, 2, (5,), generator=g).float(),
            "c": torch.zeros(3, 2, dtype=torch.float64), "e": torch.rand(1, 4, generator=g),  # rank 1: no rows
            "d": torch.rand(4, 3, generator=g, dtype=torch.float64)}


def _layouts_for(shapes: dict, rank: int, world: int) -> dict:
    out = {}
    for n, shape in shapes.items():
        chunk = -(-shape[0] // world)
        start = min(shape[0], rank * chunk)
        out[n] = gf.Layout(tuple(shape), start, max(0, min(shape[0], start + chunk) - start), chunk, 0, rank, world)
    return out


STEPS = 50


def _batches():
    g = torch.Generator().manual_seed(9)
    for _ in range(STEPS):
        yield torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


# -- workers ------------------------------------------------------------------------------------------------------

def work_core(rank: int, world: int, out: Path) -> dict:
    x, y = _data()
    ds = TensorDataset(x, y)
    model = _sharded_mlp()
    res = {"local_shapes": {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = gradsel.fisher(model, _loader(ds), progress=False, per_sample=True)
    res["said"] = [str(w.message) for w in caught if "zero Fisher" in str(w.message)]
    res["fisher"] = _pack(f)
    res["fisher_mc"] = _pack(gradsel.fisher(model, _loader(ds), progress=False, kind="mc", seed=5))
    fish = gradsel.select(model, _loader(ds), "fish", keep=20, progress=False)
    res["fish"] = {"masks": fish.masks, "selected": fish.selected(), "type": type(fish).__name__}
    res["reverse"] = gradsel.select(model, None, "reverse", keep=20, fisher=f, progress=False).masks
    fish.save(out / "fish.safetensors")
    # the top-k on its own: ties everywhere, both directions, budgets from 1 to all
    full = _tie_scores()
    lays = _layouts_for({n: t.shape for n, t in full.items()}, rank, world)
    local = {n: gf.local_rows(t, lays[n]).clone() for n, t in full.items()}
    total = sum(t.numel() for t in full.values())
    res["topk"] = []
    for k in (1, 5, 17, 40, total - 1, total):
        for largest in (True, False):
            got = gf.top_k(local, lays, k, largest=largest)
            ref = plain_top_k(full, k, largest=largest)
            res["topk"].append({"k": k, "largest": largest, "got": got,
                                "want": {n: gf.local_rows(m, lays[n]) for n, m in ref.items()}})
    res["per_tensor"] = {policy: gradsel.select(model, None, policy, keep=20, budget="per_tensor", fisher=f,
                                                progress=False).masks for policy in ("fish", "reverse")}
    res["random"] = {seed: gradsel.select(model, None, "random", keep=20, seed=seed, progress=False).masks
                     for seed in (0, 3)}
    # whole rows: budgets that end inside a row of 0 (weight + bias, 7 elements), of the LayerNorm's, of 5, ...
    res["rows"] = {(policy, keep): gradsel.select(model, None, policy, keep=keep, granularity="row", fisher=f,
                                                  progress=False)
                   for policy in ("fish", "reverse") for keep in (1, 10, 20, 47, 85)}
    res["rows"].update({("random", keep, seed): gradsel.select(model, None, "random", keep=keep, granularity="row",
                                                              seed=seed, progress=False)
                        for keep in (1, 20, 47, 85) for seed in (0, 3)})
    res["rows"].update({(policy, keep, "per_tensor"): gradsel.select(
        model, None, policy, keep=keep, granularity="row", budget="per_tensor", fisher=f, progress=False)
        for policy in ("fish", "reverse") for keep in (5, 20, 85)})
    res["rows"] = {key: {"masks": sel.masks, "info": sel.info["rows"]} for key, sel in res["rows"].items()}
    # bad inputs
    res["ird_error"] = _error(lambda: gradsel.select(model, None, "ird", keep=5, fisher=f, progress=False))
    try:
        gradsel.fisher(model, _loader(ds), progress=False, engine="vmap")
        res["vmap_error"] = None
    except gradsel.GradselError as exc:
        res["vmap_error"] = str(exc)
    res["apply_error"] = _error(lambda: fish.apply(_mlp()))  # a sharded selection on an unsharded model
    from gradsel.integrations.peft import shira_config, shira_mask_fn

    res["shira_error"] = _error(lambda: shira_config(fish, model))
    res["shira_mask_error"] = _error(lambda: shira_mask_fn(fish, model))
    res["shira_model_error"] = _error(lambda: shira_config(fish.gather(), model))
    res.update(_work_bad(rank, world))
    res["sparse"] = _work_sparse(rank, world, ds)
    res["apply"] = _work_apply(rank, world, ds)
    return res


class _Scale(nn.Module):
    """A module with a parameter of its own and no per-layer rule."""

    def __init__(self, n: int):
        super().__init__()
        self.s = nn.Parameter(torch.ones(n, dtype=torch.float64))

    def forward(self, x):
        return x * self.s


class _TokensFirst(nn.Module):
    """A Linear on (batch, tokens, features), then one on the transposed (tokens, batch, features)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 4)
        self.late = nn.Linear(4, 3)

    def forward(self, x):
        return self.late(torch.tanh(self.inp(x)).transpose(0, 1)).mean(0)


def _error(fn) -> str | None:
    try:
        fn()
    except gradsel.GradselError as exc:
        return str(exc)
    return None


def _work_bad(rank: int, world: int) -> dict:
    """Errors that every rank must raise together (FSDP2 collectives would otherwise hang)."""
    x, y = _data()
    out = {}
    torch.manual_seed(0)
    no_rule = _shard(nn.Sequential(nn.Linear(6, 4), _Scale(4), nn.Linear(4, 3)).double(), [])
    out["no_rule_error"] = _error(lambda: gradsel.fisher(no_rule, [(x[:4], y[:4])], progress=False))
    model = _sharded_mlp()
    mine = (x[:4].clone(), y[:4])
    if rank == 1:
        mine[0][1, 2] = float("inf")  # a NaN loss on rank 1 only
    out["nan_error"] = _error(lambda: gradsel.fisher(model, [mine], progress=False))
    out["empty_error"] = _error(lambda: gradsel.fisher(model, [(x[:4], y[:4])] if rank == 0 else [],
                                                       progress=False))
    # rank 0's 4 tokens look like its 4 samples to 'late'; rank 1's 5 do not: both find it out, in step
    tokens_first = _shard(_TokensFirst().double(), [])
    seq = torch.randn(4, 4 if rank == 0 else 5, 6, dtype=torch.float64)
    out["tokens_first_error"] = _error(lambda: gradsel.fisher(tokens_first, [(seq, y[:4])], progress=False))
    # an output of one copied per sample, then read only in its first copy's rows (HF Swinv2's bias MLP): found
    # on every rank together, and refused rather than credited to one sample
    table = _shard(M.indexed_shared_table().double(), [])
    out["shared_table_error"] = _error(lambda: gradsel.fisher(table, [(x[:4], y[:4])], progress=False))
    return out


def _work_sparse(rank: int, world: int, ds) -> dict:
    full_base = {k: v.clone() for k, v in _mlp(seed=2).state_dict().items()}  # before fully_shard
    model = _sharded_mlp(seed=2)
    sel = gradsel.select(model, _loader(ds), "fish", keep=15, always="7.*", progress=False)
    start = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    sharded_base = {k: v.detach().clone() for k, v in model.state_dict().items()}  # FSDP2's DTensors
    opt = sel.optimizer(model, lr=1e-2, weight_decay=0.1)
    for x, t in _batches():
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[half]), t[half]).backward()
        opt.step()
    end = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    full_sel = sel.gather()
    out = Path(os.environ["GRADSEL_TEST_OUT"])
    # each rank names its own file: only rank 0's may appear
    delta = sel.delta(model, full_base, path=out / f"delta_{rank}.safetensors")
    sel.delta(model, sharded_base, path=out / f"delta_sharded_{rank}.safetensors")
    via = SparseDelta.from_models(sel, model, full_base)  # the same, through the class method
    if rank == 0:
        via.save(out / "delta_via.safetensors")
    if rank == 0:  # the single-process reference: the same masks and trained weights on a plain model
        plain = _mlp(seed=2)
        plain.load_state_dict(end)
        SparseDelta.from_models(full_sel, plain, full_base).save(out / "delta_ref.safetensors")
    moved = dict(full_base)
    frozen = next(n for n, m in full_sel.masks.items() if not bool(m.all()))
    moved[frozen] = moved[frozen].clone()
    moved[frozen].view(-1)[int((~full_sel.masks[frozen]).reshape(-1).nonzero()[0])] += 1.0
    return {"start": start, "end": end, "base": full_base,
            "masks": sel.masks, "full_masks": full_sel.masks, "frozen": list(opt.frozen),
            "state": {n: opt.state[p]["exp_avg"].numel() for n, p in model.named_parameters() if p in opt.state},
            "delta_type": type(delta).__name__,
            "outside_error": _error(lambda: sel.delta(model, moved)),
            "mismatch_error": _error(lambda: sel.delta(model, {k: v for k, v in full_base.items() if k != "0.bias"}))}


APPLY_STEPS = 25


def _apply_optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "adagrad":  # an optimizer the guard does not know: a transient copy of the partly selected shards
        return torch.optim.Adagrad(params, lr=0.05, weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def _work_apply(rank: int, world: int, ds) -> dict:
    """Selection.apply on the FSDP2 model with torch's AdamW (decoupled decay), SGD (momentum, L2 decay) and
    Adagrad (L2 decay; unknown to the guard, so a transient copy)."""
    out = Path(os.environ["GRADSEL_TEST_OUT"])
    full_base = {k: v.clone() for k, v in _mlp(seed=2).state_dict().items()}
    model = _sharded_mlp(seed=2)
    first = gradsel.select(model, _loader(ds), "fish", keep=15, always="7.*", progress=False)
    full = first.gather()
    res = {}
    for kind in ("adamw", "sgd", "adagrad"):
        if kind != "adamw":
            model = _sharded_mlp(seed=2)
        sel = first if kind == "adamw" else gf.shard_selection(full, model)
        start = _local(model)
        opt = _apply_optimizer(kind, model.parameters())
        handle = sel.apply(model, opt)
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        leaked = 0.0
        for x, t in list(_batches())[:APPLY_STEPS]:
            half = slice(rank * 4, rank * 4 + 4)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[half]), t[half]).backward()
            for n, p in model.named_parameters():  # after FSDP2's reduce-scatter: nothing outside the local mask
                if p.grad is not None:
                    leaked = max(leaked, float(p.grad.to_local()[~sel.masks[n]].abs().sum()))
            opt.step()
            handle.step()
        state = {n: float(st["step"]) if "step" in st else None  # SGD keeps no step count
                 for n, p in model.named_parameters() if (st := opt.state.get(p))}
        res[kind] = {"start": start, "end_local": _local(model), "masks": dict(sel.masks),
                     "end": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                     "requires_grad": requires, "leaked": leaked, "state": state, "share": handle.trainable_share}
        handle.remove()
        sel.save(out / f"apply_{kind}.safetensors")
        sel.delta(model, full_base, path=out / f"apply_delta_{kind}_{rank}.safetensors")
    res["base"] = full_base
    res["clip"] = {compact: _work_clip(rank, ds, compact) for compact in (False, True)}
    return res


CLIP = 0.05  # below every step's norm here: clipping is active throughout


def _work_clip(rank: int, ds, compact: bool) -> dict:
    """SparseAdamW on FSDP2 shards with clip_grad_norm_ before each step."""
    model = _sharded_mlp(seed=2)
    sel = gradsel.select(model, _loader(ds), "fish", keep=15, always="7.*", progress=False)
    opt = sel.optimizer(model, lr=1e-2, weight_decay=0.1, compact_grads=compact)
    norms = []
    for x, t in list(_batches())[:APPLY_STEPS]:
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[half]), t[half]).backward()
        norms.append(float(opt.clip_grad_norm_(CLIP)))
        opt.step()
    return {"norms": norms, "end": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


SHIRA_STEPS = 20


def _shira_train(model: nn.Module, sel, rank: int | None):
    """A SHiRA peft model of ``model`` from ``sel`` (r=1 on 0.weight and 3.weight, head 7 saved whole), trained
    with AdamW on the first SHIRA_STEPS batches (half of each on ``rank``; all of it when None)."""
    from peft import get_peft_model

    from gradsel.integrations.peft import shira_config

    peft_model = get_peft_model(model, shira_config(sel, model))
    if rank is not None:
        _shard(peft_model, [peft_model.base_model.model[0], peft_model.base_model.model[3]])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for x, t in list(_batches())[:SHIRA_STEPS]:
        part = slice(None) if rank is None else slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        nn.functional.cross_entropy(peft_model(x[part]), t[part]).backward()
        opt.step()
    return peft_model


def _shira_selection(model: nn.Module, batches):
    from gradsel.integrations.peft import shira_select

    return shira_select(model, batches, r=1, params=["0.weight", "3.weight"], always="7.*", progress=False)


def work_shira(rank: int, world: int, out: Path) -> dict:
    """The SHiRA export under FSDP2: select (Fisher reduced across ranks), build the peft model from a
    ShardedSelection (gathered for the unsharded model), shard it, train, save_shira."""
    from gradsel.integrations.peft import save_shira, shira_mask_fn

    x, y = _data(n=12)
    half = slice(rank * 6, rank * 6 + 6)
    sel = _shira_selection(_mlp(seed=4), [(x[half], y[half])])
    sharded = gf.shard_selection(sel, _sharded_mlp(seed=4))
    model = _mlp(seed=4)
    fn = shira_mask_fn(sharded, model)  # gathered: full masks
    masks = {"0.weight": fn(model[0], 1), "3.weight": fn(model[3], 1)}
    peft_model = _shira_train(model, sharded, rank)
    local = {k: v.to_local().clone() for k, v in peft_model.state_dict().items() if "shira_weight" in k}
    save_shira(peft_model, out / "shira_fsdp")
    return {"masks": masks, "local": local}


def work_bert(rank: int, world: int, out: Path) -> dict:
    bert = M.bert().double()
    _shard(bert, list(bert.bert.encoder.layer))
    batch = M.bert_batch(n=6)
    half = slice(rank * 3, rank * 3 + 3)
    f = gradsel.fisher(bert, [{k: v[half] for k, v in batch.items()}], progress=False)
    return {"fisher": _pack(f), "local_shapes": {n: tuple(p.to_local().shape) for n, p in bert.named_parameters()}}


def work_bart(rank: int, world: int, out: Path) -> dict:
    from .test_engines import _seq2seq_loss

    bart = M.bart().double()
    _shard(bart, list(bart.model.encoder.layers) + list(bart.model.decoder.layers))
    batch = M.bart_batch(n=6)
    half = slice(rank * 3, rank * 3 + 3)
    f = gradsel.fisher(bart, [{k: v[half] for k, v in batch.items()}], loss=_seq2seq_loss, progress=False)
    return {"fisher": _pack(f)}


def _video_batch():  # 512 output positions a clip at the stem: its weight takes the grouped route
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 3, 8, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def work_video(rank: int, world: int, out: Path) -> dict:
    model = M.video_convs().double()
    _shard(model, [model.stem, model.simple, model.up])
    x, y = _video_batch()
    half = slice(rank * 3, rank * 3 + 3)
    return {"fisher": _pack(gradsel.fisher(model, [(x[half], y[half])], progress=False))}


def work_row_sparse(rank: int, world: int, out: Path) -> dict:
    """Each rank's gradients with the row-sparse backward and with the dense one, for a row selection whose rows
    lie on one rank or the other."""
    from gradsel.rowsparse import row_sparse

    model = _sharded_mlp()
    x, y = _data()
    half = slice(rank * 7, rank * 7 + 7)
    f = gradsel.fisher_loop(_mlp(), (x, y), progress=False)  # one process's: the same selection on every rank
    sel = gradsel.select(model, None, "fish", keep=25, granularity="row", fisher=f, progress=False)
    grads = {}
    for mode in ("dense", "rows"):
        model.zero_grad()
        handle = row_sparse(model, sel) if mode == "rows" else None
        torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        grads[mode] = {n: None if p.grad is None else p.grad.to_local().clone() for n, p in model.named_parameters()}
        if handle is not None:
            grads["layers"] = dict(handle.layers)
            handle.remove()
    return {"grads": grads, "masks": {n: m.clone() for n, m in sel.masks.items()},
            "layouts": {n: (lay.start, lay.rows) for n, lay in sel.layouts.items()}}


def work_row_training(rank: int, world: int, out: Path) -> dict:
    """Whole-row training on FSDP2: a row selection sharded onto the model, Selection.apply with AdamW and the
    row-sparse backward, 10 steps; the full parameters at the end (gathered on every rank)."""
    from gradsel.rowsparse import row_sparse

    x, y = _data()
    full = gradsel.select(_mlp(seed=2), [(x, y)], "fish", keep=30, granularity="row", progress=False)
    model = _sharded_mlp(seed=2)
    sel = gf.shard_selection(full, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle, rows = sel.apply(model, opt), row_sparse(model, sel)
    for xb, tb in list(_batches())[:10]:
        half = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb[half]), tb[half]).backward()
        opt.step()
        handle.step()
    layers = dict(rows.layers)
    rows.remove()
    handle.remove()
    return {"end": {n: gf._full(p).detach().clone() for n, p in model.named_parameters()}, "layers": layers}


def _bert_heads(hidden: int = 32, heads: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2, attn_implementation="eager")).double()


HEAD_BUDGETS = [(policy, keep) for policy in ("fish", "reverse", "random") for keep in (50, 700, 3000)]


def work_heads(rank: int, world: int, out: Path) -> dict:
    """granularity='head' on a BERT whose encoder layers are units (2 heads of 16 rows: one a rank)."""
    bert = _bert_heads()
    _shard(bert, list(bert.bert.encoder.layer))
    f = gradsel.fisher_loop(_bert_heads(), M.bert_batch(n=6), progress=False)
    res = {}
    for policy, keep in HEAD_BUDGETS:
        sel = gradsel.select(bert, None, policy, keep=keep, granularity="head", fisher=f, seed=1, progress=False)
        res[(policy, keep)] = {"masks": sel.masks, "info": sel.info["rows"],
                               "layouts": {n: (lay.start, lay.rows) for n, lay in sel.layouts.items()}}
    odd = _bert_heads(hidden=24, heads=3)  # 3 heads of 8 rows: rank 1's 12 rows start inside the second head
    _shard(odd, list(odd.bert.encoder.layer))
    res["error"] = _error(lambda: gradsel.select(odd, None, "fish", keep=50, granularity="head",
                                                 fisher=gradsel.fisher_loop(_bert_heads(24, 3), M.bert_batch(n=6),
                                                                            progress=False), progress=False))
    return res


def _not_same_even(name, param):  # a params= spec
    return not name.startswith("same_even.")


def _norm_batch():
    g = torch.Generator().manual_seed(6)
    return torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def work_norm_act(rank: int, world: int, out: Path) -> dict:
    model = M.norm_act_depthwise().double()
    _shard(model, [model.bn, model.gn, model.ln2d])  # the norms as units of their own, and in the root (ln)
    x, y = _norm_batch()
    half = slice(rank * 3, rank * 3 + 3)
    # (the even kernel padded "same", which torch pads unevenly, takes a fallback: FSDP2 has none)
    f = gradsel.fisher(model, [(x[half], y[half])], params=_not_same_even, progress=False)
    return {"fisher": _pack(f)}


def work_unet(rank: int, world: int, out: Path) -> dict:
    model = M.unet().double()  # encoder_depth=3: the encoder's last two stages never run
    _shard(model, [model.encoder, model.decoder])
    x, y = M.unet_batch(n=4)
    half = slice(rank * 2, rank * 2 + 2)
    return {"fisher": _pack(gradsel.fisher(model, [(x[half].double(), y[half])], progress=False))}


# -- tests --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def core_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return _spawn("work_core", out), out


def _assert_shards(run: dict, ref, rtol: float = 1e-10) -> None:
    got = run["fisher"] if "fisher" in run else run
    assert got["sharded"] and got["num_samples"] == ref.num_samples
    assert sorted(got["scores"]) == sorted(ref)
    largest = max(float(t.abs().max()) for t in ref.values())
    for n, full in ref.items():
        lay = got["layouts"][n]
        assert lay.shape == tuple(full.shape)
        assert tuple(got["scores"][n].shape) == lay.local_shape  # the shard, never the whole tensor
        want = full[lay.start:lay.start + lay.rows]
        torch.testing.assert_close(got["scores"][n], want, rtol=rtol, atol=rtol * largest, msg=n)


def test_fisher_shards_equal_one_process(core_runs, one_thread):
    """Each rank holds its Shard(0) rows of the one-process Fisher (float64, uneven shards, uneven chunk counts)."""
    runs, _ = core_runs
    x, y = _data()
    ref = gradsel.fisher_loop(_mlp(), (x, y), progress=False, per_sample=True)
    ref_mc = gradsel.fisher_loop(_mlp(), (x, y), progress=False, kind="mc", seed=5)
    for run in runs:
        _assert_shards(run["fisher"], ref)
        _assert_shards(run["fisher_mc"], ref_mc)
        torch.testing.assert_close(run["fisher"]["per_sample"], ref.per_sample, rtol=1e-10, atol=0)
        torch.testing.assert_close(run["fisher"]["sample_index"], ref.sample_index)
        for n, lay in run["fisher"]["layouts"].items():
            assert lay.local_shape == run["local_shapes"][n]  # the same layout as the parameter's DTensor shard
    # the shards are uneven and together cover every row once
    for n, full in ref.items():
        lays = [run["fisher"]["layouts"][n] for run in runs]
        assert [lay.start for lay in lays] == [0, lays[0].rows] and sum(lay.rows for lay in lays) == full.shape[0]
    assert runs[0]["fisher"]["layouts"]["0.weight"].rows == 4 and runs[1]["fisher"]["layouts"]["0.weight"].rows == 3
    assert runs[1]["fisher"]["layouts"]["5.weight"].rows == 0  # an empty shard
    # per round 3 flag all-reduces (the data's, the label check's, the engine's: does any rank check a layer's
    # batch dimension?) + one reduce-scatter per unit (3 units); 3 rounds (rank 1, with 2 chunks of its own, ran
    # its last one again), one more in the first round after that batch-dimension check (does any rank lift a
    # layer found not to hold the samples?), a last flag exchange and one for the tensors zero on every rank: the
    # ranks stayed in step
    stats = runs[0]["fisher"]["stats"]
    assert stats == runs[1]["fisher"]["stats"] and stats["collectives"] == 3 * (3 + 3) + 1 + 2
    assert runs[0]["said"] == runs[1]["said"] == []  # rank 1's empty shard of 5.weight is not a zero Fisher
    assert stats["bytes"] > 0
    # the most of the Fisher held in full shape at once is one unit's sums (float64 here), never the model's
    per_unit: dict = {}
    for n, lay in runs[0]["fisher"]["layouts"].items():
        per_unit[lay.unit] = per_unit.get(lay.unit, 0) + 8 * ref[n].numel()
    assert stats["full_bytes"] == max(per_unit.values()) < sum(per_unit.values())


@pytest.mark.parametrize("policy", ["fish", "reverse"])
def test_masks_equal_one_process_top_k(core_runs, policy, one_thread):
    runs, _ = core_runs
    x, y = _data()
    ref = gradsel.select(_mlp(), _loader(TensorDataset(x, y), distributed=False), policy, keep=20, progress=False)
    for run in runs:
        masks = run["fish"]["masks"] if policy == "fish" else run["reverse"]
        lays = run["fisher"]["layouts"]
        for n, m in ref.masks.items():
            assert torch.equal(masks[n], m[lays[n].start:lays[n].start + lays[n].rows]), (policy, n)
    if policy == "fish":
        assert all(run["fish"]["selected"] == 20 and run["fish"]["type"] == "ShardedSelection" for run in runs)


@pytest.mark.parametrize("policy", ["fish", "reverse"])
def test_per_tensor_masks_equal_one_process(core_runs, policy, one_thread):
    runs, _ = core_runs
    x, y = _data()
    ref = gradsel.select(_mlp(), _loader(TensorDataset(x, y), distributed=False), policy, keep=20,
                         budget="per_tensor", progress=False)
    glob = gradsel.select(_mlp(), _loader(TensorDataset(x, y), distributed=False), policy, keep=20, progress=False)
    assert sum(int(m.sum()) for m in ref.masks.values()) == 20
    assert any(not torch.equal(ref.masks[n], glob.masks[n]) for n in ref.masks)  # not the global budget's masks
    for run in runs:
        lays = run["fisher"]["layouts"]
        for n, m in ref.masks.items():
            assert torch.equal(run["per_tensor"][policy][n], m[lays[n].start:lays[n].start + lays[n].rows]), n


@pytest.mark.parametrize("policy", ["fish", "reverse"])
def test_row_masks_equal_one_process(core_runs, policy, one_thread):
    """granularity='row' on the shards: the one-process masks, the partial row included (filled by its rank)."""
    runs, _ = core_runs
    x, y = _data()
    f = gradsel.fisher_loop(_mlp(), (x, y), progress=False)
    for keep in (1, 10, 20, 47, 85):
        ref = gradsel.select(_mlp(), None, policy, keep=keep, granularity="row", fisher=f, progress=False)
        for run in runs:
            got = run["rows"][(policy, keep)]
            lays = run["fisher"]["layouts"]
            assert got["info"] == ref.info["rows"], (policy, keep)
            for n, m in ref.masks.items():
                assert torch.equal(got["masks"][n], m[lays[n].start:lays[n].start + lays[n].rows]), (policy, keep, n)
        assert sum(int(run["rows"][(policy, keep)]["masks"][n].sum()) for run in runs for n in ref.masks) == keep


@pytest.mark.parametrize("policy", ["fish", "reverse"])
def test_per_tensor_row_masks_equal_one_process(core_runs, policy, one_thread):
    """budget='per_tensor' by row: each row unit (a weight with its bias) its one-process share of k."""
    runs, _ = core_runs
    x, y = _data()
    f = gradsel.fisher_loop(_mlp(), (x, y), progress=False)
    for keep in (5, 20, 85):
        ref = gradsel.select(_mlp(), None, policy, keep=keep, granularity="row", budget="per_tensor", fisher=f,
                             progress=False)
        for run in runs:
            got, lays = run["rows"][(policy, keep, "per_tensor")], run["fisher"]["layouts"]
            assert got["info"] == ref.info["rows"], (policy, keep)
            for n, m in ref.masks.items():
                assert torch.equal(got["masks"][n], m[lays[n].start:lays[n].start + lays[n].rows]), (policy, keep, n)


def test_random_row_masks_equal_one_process(core_runs, one_thread):
    """random by row on the shards draws what one process draws for the same seed (over rows, 8 bytes each)."""
    runs, _ = core_runs
    for keep in (1, 20, 47, 85):
        for seed in (0, 3):
            ref = gradsel.select(_mlp(), None, "random", keep=keep, granularity="row", seed=seed, progress=False)
            for run in runs:
                got, lays = run["rows"][("random", keep, seed)], run["fisher"]["layouts"]
                assert got["info"] == ref.info["rows"], (keep, seed)
                for n, m in ref.masks.items():
                    assert torch.equal(got["masks"][n], m[lays[n].start:lays[n].start + lays[n].rows]), (keep, seed, n)


def test_row_sparse_backward_on_shards_forms_every_ranks_rows(tmp_path, one_thread):
    # a ShardedSelection holds each rank's rows of the masks: row_sparse had taken those local row numbers for the
    # full weight's, so a row selected on rank 1 got another row's gradient (2.weight 0.09 off), silently
    runs = _spawn("work_row_sparse", tmp_path)
    full = gradsel.select(_mlp(), None, "fish", keep=25, granularity="row",
                          fisher=gradsel.fisher_loop(_mlp(), _data(), progress=False), progress=False)
    for rank, run in enumerate(runs):
        dense, rows = run["grads"]["dense"], run["grads"]["rows"]
        for n, m in run["masks"].items():
            if m.any():
                torch.testing.assert_close(rows[n][m], dense[n][m], rtol=0, atol=1e-15, msg=(rank, n))
            if m.any() and m.dim() == 2:  # (a bias keeps its full gradient: a sum over the output gradient)
                touched = full.masks[n].any(1)[run["layouts"][n][0]:][:m.shape[0]]
                assert not rows[n][~touched].any(), (rank, n)  # rows no rank selected: no gradient formed
        # the touched rows counted over every rank's shard, as the full masks have them
        for layer, (touched, total) in run["grads"]["layers"].items():
            mask = full.masks[f"{layer}.weight"]
            assert (touched, total) == (int(mask.any(1).sum()), mask.shape[0])


def test_head_masks_equal_one_process(tmp_path, one_thread):
    """granularity='head' on the shards (each rank holding whole heads): the one-process masks, for the three
    policies, with a partial head or row where the budget ends inside one."""
    runs = _spawn("work_heads", tmp_path)
    f = gradsel.fisher_loop(_bert_heads(), M.bert_batch(n=6), progress=False)
    partial = set()
    for policy, keep in HEAD_BUDGETS:
        ref = gradsel.select(_bert_heads(), None, policy, keep=keep, granularity="head", fisher=f, seed=1,
                             progress=False)
        partial.add(ref.info["rows"]["partial_row"])
        for run in runs:
            got = run[(policy, keep)]
            assert got["info"] == ref.info["rows"], (policy, keep)
            for n, m in ref.masks.items():
                start, rows = got["layouts"][n]
                assert torch.equal(got["masks"][n], m[start:start + rows]), (policy, keep, n)
    assert any(p and "attention.self" in p for p in partial)  # a head cut by the budget
    for run in runs:
        assert "whole heads" in run["error"] and "'bert.encoder.layer.0.attention.self.query.weight'" in run["error"]


def test_row_sparse_training_on_fsdp2_equals_one_process(tmp_path, one_thread):
    # the row selection, Selection.apply and the row-sparse backward together on shards: one process's masked
    # AdamW trajectory (dense backward) over the same global batches
    runs = _spawn("work_row_training", tmp_path)
    x, y = _data()
    model = _mlp(seed=2)
    sel = gradsel.select(model, [(x, y)], "fish", keep=30, granularity="row", progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with sel.apply(model, opt) as handle:
        for xb, tb in list(_batches())[:10]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), tb).backward()
            opt.step()
            handle.step()
    assert runs[0]["layers"] and runs[0]["layers"] == runs[1]["layers"]  # some layers skipped rows, alike
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[n]) or not sel.masks[n].any(), n
        for run in runs:
            torch.testing.assert_close(run["end"][n], p.detach(), rtol=0, atol=1e-10, msg=n)


def test_random_masks_by_global_position(core_runs):
    """FSDP2's random masks: the top 20 of position_scores over the full tensors' global positions (one process),
    each rank holding its rows; other seeds, other masks."""
    runs, _ = core_runs
    shapes = {n: p.shape for n, p in _mlp().named_parameters()}
    scores = gf.position_scores(torch.arange(sum(math.prod(s) for s in shapes.values())), 3)
    full, offset = {}, 0
    for n, shape in shapes.items():
        full[n] = scores[offset:offset + math.prod(shape)].reshape(shape)
        offset += math.prod(shape)
    want = plain_top_k(full, 20)
    for run in runs:
        lays = run["fisher"]["layouts"]
        for n, m in want.items():
            assert torch.equal(run["random"][3][n], m[lays[n].start:lays[n].start + lays[n].rows]), n
        assert any(not torch.equal(run["random"][0][n], run["random"][3][n]) for n in want)
    assert sum(int(runs[r]["random"][3][n].sum()) for r in range(2) for n in want) == 20


def test_sharded_top_k_ties_equal_plain_top_k(core_runs):
    runs, _ = core_runs
    for run in runs:
        assert len(run["topk"]) == 12
        for case in run["topk"]:
            for n, want in case["want"].items():
                assert torch.equal(case["got"][n], want), (case["k"], case["largest"], n)


def test_saved_file_is_complete(core_runs, one_thread):
    runs, out = core_runs
    sel = gradsel.Selection.load(out / "fish.safetensors", _mlp())
    x, y = _data()
    ref = gradsel.select(_mlp(), _loader(TensorDataset(x, y), distributed=False), "fish", keep=20, progress=False)
    assert sel.selected() == sel.budget == 20
    for n, m in ref.masks.items():
        assert tuple(sel.masks[n].shape) == tuple(m.shape)  # full shapes: not rank 0's rows
        assert torch.equal(sel.masks[n], m), n


def test_sparse_adamw_on_shards_equals_dense_adamw(core_runs, one_thread):
    runs, _ = core_runs
    x, y = _data()
    model = _mlp(seed=2)
    sel = gradsel.select(model, _loader(TensorDataset(x, y), distributed=False), "fish", keep=15, always="7.*",
                         progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with sel.apply(model, opt) as handle:
        for xb, tb in _batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), tb).backward()
            opt.step()
            handle.step()
    for run in runs:
        sparse = run["sparse"]
        for n, m in sel.masks.items():
            assert torch.equal(sparse["full_masks"][n], m), n
        for n, p in model.named_parameters():
            torch.testing.assert_close(sparse["end"][n], p.detach(), rtol=0, atol=1e-6, msg=n)
            m = sel.masks[n]
            assert torch.equal(sparse["end"][n][~m], sparse["start"][n][~m]), n  # masked entries never moved
        # state only for this rank's selected elements (dense for the always= head)
        for n, count in sparse["state"].items():
            local = sparse["masks"][n]
            assert count == (local.numel() if bool(sel.masks[n].all()) else int(local.sum())), n
        assert sorted(sparse["frozen"]) == sorted(n for n, m in sel.masks.items() if not bool(m.any()))
    for n, m in sel.masks.items():
        if n in runs[0]["sparse"]["state"] and not bool(m.all()):
            assert runs[0]["sparse"]["state"][n] + runs[1]["sparse"]["state"].get(n, 0) == int(m.sum())


def test_sharded_delta_is_one_complete_file(core_runs, one_thread):
    """Rank 0 alone writes the delta, equal byte for byte to one process's over the same masks and trained weights
    (from a full or FSDP2's sharded base), and merging it onto the base gives the trained full weights."""
    runs, out = core_runs
    ref = (out / "delta_ref.safetensors").read_bytes()
    assert (out / "delta_0.safetensors").read_bytes() == ref
    assert (out / "delta_sharded_0.safetensors").read_bytes() == ref
    assert (out / "delta_via.safetensors").read_bytes() == ref
    assert not (out / "delta_1.safetensors").exists() and not (out / "delta_sharded_1.safetensors").exists()
    assert [run["sparse"]["delta_type"] for run in runs] == ["SparseDelta", "NoneType"]
    delta = SparseDelta.load(out / "delta_0.safetensors")
    sparse = runs[0]["sparse"]
    assert {e.name for e in delta.entries} == {n for n in sparse["end"]
                                              if not torch.equal(sparse["end"][n], sparse["base"][n])}
    assert 0 < delta.numel() <= 15 + 6  # the selected elements and the always= head, nothing else
    model = _mlp(seed=2)
    model.load_state_dict(sparse["base"])
    delta.merge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), sparse["end"][n]), n
    for run in runs:  # raised on every rank together
        assert "outside the selection" in run["sparse"]["outside_error"]
        assert "different entries" in run["sparse"]["mismatch_error"] and "0.bias" in run["sparse"]["mismatch_error"]


def test_sharded_bad_inputs(core_runs):
    runs, _ = core_runs
    for run in runs:
        assert "not supported on sharded models" in run["ird_error"]  # IRD
        assert "engine='vmap'" in run["vmap_error"]
        assert "not sharded by fully_shard" in run["apply_error"]
        assert "'1.s'" in run["no_rule_error"] and "exclude=" in run["no_rule_error"]
        assert "'late.weight'" in run["tokens_first_error"]  # never computed as if its tokens were samples
        assert "'mlp.weight'" in run["shared_table_error"]
        assert "1 rank(s) hold no samples" in run["empty_error"]
        for key in ("shira_error", "shira_mask_error", "shira_model_error"):  # peft layers go in before fully_shard
            assert "before fully_shard" in run[key] and "get_peft_model" in run[key] and "save_shira" in run[key], key
    assert "'0.weight'" in runs[1]["nan_error"] and "NaN" in runs[1]["nan_error"]  # the rank that failed
    assert "rank 1 failed" in runs[0]["nan_error"] and "NaN" in runs[0]["nan_error"]  # the other, told why


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adagrad"])
def test_apply_on_fsdp2_equals_one_process_masked_training(core_runs, kind, one_thread):
    """Selection.apply on FSDP2 with torch's own optimizers (AdamW, SGD: the guard's math; Adagrad: its transient
    copy): masked entries of every rank's shard bit for bit fixed, no gradient left outside the mask after the reduce-scatter, unselected tensors frozen on every rank,
    and the trajectory of one process under apply with the same global batches (float64, 25 steps)."""
    runs, out = core_runs
    x, y = _data()
    model = _mlp(seed=2)
    sel = gradsel.select(model, _loader(TensorDataset(x, y), distributed=False), "fish", keep=15, always="7.*",
                         progress=False)
    opt = _apply_optimizer(kind, model.parameters())
    with sel.apply(model, opt) as handle:
        for xb, tb in list(_batches())[:APPLY_STEPS]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), tb).backward()
            opt.step()
            handle.step()
    frozen = {n for n, m in sel.masks.items() if not bool(m.any())}
    assert frozen and len(frozen) < len(sel.masks)
    for rank, run in enumerate(runs):
        got = run["apply"][kind]
        assert got["leaked"] == 0.0
        assert {n for n, r in got["requires_grad"].items() if not r} == frozen
        # frozen tensors never stepped (Adagrad creates its state at construction, the others at the first step)
        assert all(got["state"].get(n, 0) == 0 for n in frozen)
        assert all(got["state"][n] in (APPLY_STEPS, None) for n in set(sel.masks) - frozen)
        assert got["share"] == handle.trainable_share  # over all ranks, not this rank's shard
        for n, p in model.named_parameters():
            lay = run["fisher"]["layouts"][n]
            assert torch.equal(got["masks"][n], sel.masks[n][lay.start:lay.start + lay.rows]), n
            m = got["masks"][n]
            assert torch.equal(got["end_local"][n][~m], got["start"][n][~m]), (rank, n)  # bit for bit
            torch.testing.assert_close(got["end"][n], p.detach(), rtol=0, atol=1e-6, msg=n)
        moved = [n for n in sel.masks if n not in frozen and not torch.equal(got["end"][n], run["apply"]["base"][n])]
        assert set(moved) == set(sel.masks) - frozen  # every trained tensor moved
    # the files after training: one complete selection and one delta, from rank 0 only
    saved = gradsel.Selection.load(out / f"apply_{kind}.safetensors", _mlp())
    assert all(torch.equal(saved.masks[n], m) for n, m in sel.masks.items())
    assert not (out / f"apply_delta_{kind}_1.safetensors").exists()
    delta = SparseDelta.load(out / f"apply_delta_{kind}_0.safetensors")
    merged = _mlp(seed=2)
    delta.merge(merged)
    for n, p in merged.named_parameters():
        assert torch.equal(p.detach(), runs[0]["apply"][kind]["end"][n]), n


@pytest.mark.parametrize("compact", [False, True])
def test_sparse_adamw_clipping_on_shards_equals_one_process(core_runs, compact, one_thread):
    """clip_grad_norm_ on FSDP2 shards takes the norm over every rank's selected entries: the norms of each step
    and the trajectory equal one process's SparseAdamW clipped the same way."""
    runs, _ = core_runs
    x, y = _data()
    model = _mlp(seed=2)
    sel = gradsel.select(model, _loader(TensorDataset(x, y), distributed=False), "fish", keep=15, always="7.*",
                         progress=False)
    opt = sel.optimizer(model, lr=1e-2, weight_decay=0.1, compact_grads=compact)
    norms = []
    for xb, tb in list(_batches())[:APPLY_STEPS]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), tb).backward()
        norms.append(float(opt.clip_grad_norm_(CLIP)))
        opt.step()
    assert min(norms) > CLIP  # clipping was active at every step
    for run in runs:
        got = run["apply"]["clip"][compact]
        assert got["norms"] == pytest.approx(norms, rel=1e-10)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["end"][n], p.detach(), rtol=0, atol=1e-6, msg=n)


def test_shira_export_under_fsdp2_is_one_complete_adapter(tmp_path, one_thread):
    """save_shira on an FSDP2-sharded SHiRA peft model: rank 0 writes one adapter, equal to the one-process
    adapter (same keys and indices, values within 1e-6 after the same training), loadable by peft."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors.torch import load_file

    runs = _spawn("work_shira", tmp_path)
    x, y = _data(n=12)
    sel = _shira_selection(_mlp(seed=4), [(x, y)])
    ref = _shira_train(_mlp(seed=4), sel, None)
    ref.save_pretrained(tmp_path / "shira_one")
    for run in runs:
        for n, m in run["masks"].items():
            assert torch.equal(m.bool(), sel.masks[n]), n  # the ShardedSelection, gathered, gives the full masks
    got = load_file(tmp_path / "shira_fsdp" / "adapter_model.safetensors")
    want = load_file(tmp_path / "shira_one" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any("shira_indices" in k for k in want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k  # complete tensors, not rank 0's slice
        if "indices" in k:
            assert torch.equal(got[k], v), k
        else:
            torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    key = next(k for k in want if "shira_weight" in k)
    local = runs[0]["local"][key + ".default"]  # peft's adapter name, dropped in the file
    assert local.numel() < got[key].numel()  # rank 0 held a slice only
    batch = torch.randn(5, 6, dtype=torch.float64)
    loaded = PeftModel.from_pretrained(_mlp(seed=4), tmp_path / "shira_fsdp").eval()
    one = PeftModel.from_pretrained(_mlp(seed=4), tmp_path / "shira_one").eval()
    torch.testing.assert_close(loaded(batch), one(batch), rtol=0, atol=1e-5)
    assert not torch.allclose(loaded(batch), _mlp(seed=4)(batch))  # the adapter changed the model


@pytest.mark.slow
def test_fisher_bert_shards_equal_one_process(tmp_path, one_thread):
    runs = _spawn("work_bert", tmp_path)
    bert, batch = M.bert().double(), M.bert_batch(n=6)
    ref = gradsel.fisher_loop(bert, batch, progress=False)
    for run in runs:
        _assert_shards(run["fisher"], ref)
        for n, lay in run["fisher"]["layouts"].items():
            assert lay.local_shape == run["local_shapes"][n]


@pytest.mark.slow
def test_fisher_bart_shards_equal_one_process(tmp_path, one_thread):
    # BART's embedding subclasses (read at their lookups), its token embedding tied to the LM head, under FSDP2
    from .test_engines import _seq2seq_loss

    runs = _spawn("work_bart", tmp_path)
    ref = gradsel.fisher_loop(M.bart().double(), M.bart_batch(n=6), loss=_seq2seq_loss, progress=False)
    for run in runs:
        _assert_shards(run["fisher"], ref)


@pytest.mark.slow
def test_fisher_video_convs_shard_equal_one_process(tmp_path, one_thread):
    # Conv3d rules (the grouped route at the stem, the kernel one sample at a time, depthwise, 1×1×1, transposed)
    runs = _spawn("work_video", tmp_path)
    ref = gradsel.fisher_loop(M.video_convs().double(), _video_batch(), progress=False)
    for run in runs:
        _assert_shards(run["fisher"], ref)


@pytest.mark.slow
def test_fisher_norm_act_shards_equal_one_process(tmp_path, one_thread):
    # timm's norm + activation layers read their affine parameters to recompute the norm's output: under FSDP2,
    # after the backward, those are the rank's shards
    runs = _spawn("work_norm_act", tmp_path)
    ref = gradsel.fisher_loop(M.norm_act_depthwise().double(), _norm_batch(), params=_not_same_even, progress=False)
    for run in runs:
        _assert_shards(run["fisher"], ref)


@pytest.mark.slow
def test_fisher_unet_with_unused_stages_shards_equal_one_process(tmp_path, one_thread):
    # FSDP2 puts an autograd Function of its own into every unit's graph; taken as one that may hide parameter
    # uses (as reentrant checkpointing's does), the stages that never run went to a fallback FSDP2 cannot run
    runs = _spawn("work_unet", tmp_path)
    x, y = M.unet_batch(n=4)
    ref = gradsel.fisher_loop(M.unet().double(), (x.double(), y), progress=False)
    assert float(ref["encoder.layer4.1.conv2.weight"].abs().max()) == 0.0
    for run in runs:
        _assert_shards(run["fisher"], ref)
