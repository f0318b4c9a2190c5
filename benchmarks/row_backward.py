"""What the row-sparse backward saves: backward time against the selected row share, dense vs row-sparse.

Run: ``python -m benchmarks.row_backward`` (``--quick`` for tiny sizes, a check that it runs; written to
``row_backward_quick``). Writes ``benchmarks/results/row_backward.{md,json}`` (``_1thread`` with
``--threads 1``, the recipes' setting; ``_fish`` with ``--selection fish``; ``_cuda`` on a GPU).

For the BERT-from-config (4 layers, hidden 256, seq 64, batch 16) and the smp Unet-resnet18 (batch 8,
128×128), every ``nn.Linear`` / ``nn.Conv2d`` weight gets a mask of whole rows (output rows / channels):
by default the same ``share`` of each layer's rows, drawn at random (seeded), so that every layer is
partly selected (the hardest case); with ``--selection fish``, FISH's row budget of ``share`` of those
weights' elements, ranked across layers by the Fisher of the benchmark's batch (what a user's
``granularity="row"`` selection gives: some layers whole, some partly, some not at all). Four backwards of
the same forward, in one process, interleaved ``--rounds`` times (best of each):

- ``dense``: autograd's backward, every weight gradient in full (what a mask costs without row_sparse);
- ``row-sparse``: under :func:`gradsel.rowsparse.row_sparse`, the weight gradient of the selected rows only;
- ``compact``: the same with ``compact=True``: the rows' gradient kept as a sparse tensor of those rows, not
  written into a zero gradient of the weight's shape;
- ``no weight grad``: those weights with ``requires_grad=False`` (input gradients still flow): the floor,
  the backward without any of their weight gradients.

``--threads 1 --clock thread`` times the calling thread's CPU time instead of the wall clock: on a machine
shared with other jobs it is not inflated by lost time slices (cache and memory-bandwidth contention remain).

``weight-grad ratio`` = (row-sparse − floor) / (dense − floor): the weight-gradient part of backward
relative to dense; the target is ≤ 0.35 at a 25% row share. At 100% every row is selected and row_sparse
leaves the layers dense (nothing to skip), so that row measures the noise.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import gradsel
from gradsel.rowsparse import row_sparse

from .common import CLOCKS, machine, md_table, write

SHARES = (1.0, 0.5, 0.25, 0.1)


def bert(device, quick=False):
    from transformers import BertConfig, BertForSequenceClassification

    layers, hidden, seq, n, vocab = (2, 64, 16, 4, 500) if quick else (4, 256, 64, 16, 30522)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, num_labels=2, attn_implementation="eager")).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (n, seq), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": (ids[:, 0] % 2).to(device)}
    label = f"BERT {layers}×{hidden}, batch {n}, seq {seq}"
    return label, model, lambda: model(**batch).loss, [batch]


def unet(device, quick=False):
    import segmentation_models_pytorch as smp

    size, n = (32, 2) if quick else (128, 8)
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    y = (x[:, 0] > 0).long()
    return (f"smp Unet-resnet18, batch {n}, {size}×{size}", model,
            lambda: nn.functional.cross_entropy(model(x), y), [(x, y)])


def row_masks(model: nn.Module, share: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every Linear / Conv2d weight: ``round(share * rows)`` random whole rows (at least one)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            rows = module.weight.shape[0]
            mask = torch.zeros(module.weight.shape, dtype=torch.bool)
            mask[torch.randperm(rows, generator=g)[: max(1, round(share * rows))]] = True
            masks[f"{prefix}.weight"] = mask
    return masks


def fish_masks(model: nn.Module, weights: list[str], fisher, share: float) -> dict[str, torch.Tensor]:
    """What a user's row budget gives: FISH at ``granularity="row"`` over the Linear / Conv2d weights, ``share``
    of their elements (rows ranked by Fisher mass across all layers, so layers get unequal shares)."""
    sel = gradsel.select(model, None, "fish", keep=share, params=weights, fisher=fisher, granularity="row",
                         progress=False)
    return {n: sel.masks[n] for n in weights}


def layer_spread(masks: dict[str, torch.Tensor]) -> str:
    """How many weights have every row touched / some / none."""
    counts = {"all": 0, "some": 0, "none": 0}
    for m in masks.values():
        touched = m.reshape(m.shape[0], -1).any(1)
        counts["all" if bool(touched.all()) else "some" if bool(touched.any()) else "none"] += 1
    return f"{counts['all']}/{counts['some']}/{counts['none']}"


def weight_grad_flops(model: nn.Module, loss_fn, weights: list[str]) -> dict[str, int]:
    """Multiply-adds of each weight's gradient in one backward: output positions (all samples) × its elements."""
    positions: dict[str, int] = {}

    def hook(name):
        def record(m, inputs, out):  # output positions: elements over the output channels / features
            positions[name] = out.numel() // out.shape[1 if isinstance(m, nn.Conv2d) else -1]
        return record

    handles = [model.get_submodule(n[: -len(".weight")]).register_forward_hook(hook(n)) for n in weights]
    try:
        with torch.no_grad():
            loss_fn()
    finally:
        for h in handles:
            h.remove()
    return {n: positions.get(n, 0) * model.get_parameter(n).numel() for n in weights}


def flop_share(masks: dict[str, torch.Tensor], flops: dict[str, int]) -> float:
    """The share of the weight-gradient multiply-adds that the touched rows need."""
    touched = {n: float(m.reshape(m.shape[0], -1).any(1).float().mean()) for n, m in masks.items()}
    return sum(touched[n] * f for n, f in flops.items()) / max(1, sum(flops.values()))


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def backward_time(model, loss_fn, device, repeats, clock=time.perf_counter) -> float:
    """Best backward seconds of ``repeats`` forward+backward runs (one warm-up)."""
    best = float("inf")
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        _sync(device)
        t0 = clock()
        loss.backward()
        _sync(device)
        if i:
            best = min(best, clock() - t0)
    return best


def run(device="cpu", rounds=3, repeats=3, quick=False, shares=SHARES, clock=time.perf_counter, selection="uniform"):
    rows = []
    for make in (bert, unet):
        label, model, loss_fn, data = make(device, quick)
        model.train()
        weights = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        weights = [f"{n}.weight" for n in weights]
        if selection == "fish":  # one Fisher of the benchmark's batch, every share ranked by it
            fisher = gradsel.fisher(model, data, params=weights, progress=False)
            masks = {s: fish_masks(model, weights, fisher, s) for s in shares}
        else:
            masks = {s: row_masks(model, s) for s in shares}
        total = sum(p.numel() for p in model.parameters())
        covered = sum(model.get_parameter(n).numel() for n in weights)
        flops = weight_grad_flops(model, loss_fn, weights)

        def dense():
            return backward_time(model, loss_fn, device, repeats, clock)

        def floor():
            frozen = [model.get_parameter(n) for n in weights]
            for p in frozen:
                p.requires_grad_(False)
            try:
                return backward_time(model, loss_fn, device, repeats, clock)
            finally:
                for p in frozen:
                    p.requires_grad_(True)

        def sparse(share, compact=False):
            def fn():
                with row_sparse(model, masks[share], compact=compact) as handle:
                    assert not handle.skipped, handle.skipped
                    return backward_time(model, loss_fn, device, repeats, clock)
            return fn

        best: dict[str, float] = {}
        for _ in range(rounds):  # interleaved, so that load from other jobs hits every configuration alike
            configs = [("dense", dense), ("floor", floor)] + [(s, sparse(s)) for s in shares]
            configs += [(("compact", s), sparse(s, compact=True)) for s in shares]
            for key, fn in configs:
                best[key] = min(best.get(key, float("inf")), fn())
        for share in shares:
            t_dense, t_floor, t_sparse, t_compact = best["dense"], best["floor"], best[share], best[("compact", share)]
            rows.append({
                "model": label, "row share": share, "Linear/Conv weights share of params": covered / total,
                "weights with all / some / no rows": layer_spread(masks[share]),
                "touched rows' share of weight-grad flops": flop_share(masks[share], flops),
                "dense backward (s)": t_dense, "row-sparse backward (s)": t_sparse,
                "no weight grad backward (s)": t_floor, "backward ratio": t_sparse / t_dense,
                "weight-grad part, dense (s)": t_dense - t_floor,
                "weight-grad ratio": (t_sparse - t_floor) / (t_dense - t_floor) if t_dense > t_floor else float("nan"),
                "compact backward (s)": t_compact,
                "weight-grad ratio, compact": ((t_compact - t_floor) / (t_dense - t_floor) if t_dense > t_floor
                                               else float("nan")),
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--repeats", type=int, default=3, help="timed backwards per configuration and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="thread: CPU time of the calling thread (needs --threads 1 on the CPU; the autograd "
                             "engine runs a CPU backward there), which time slices lost to other jobs do not inflate")
    parser.add_argument("--quick", action="store_true", help="tiny models: check that it runs (timings mean nothing)")
    parser.add_argument("--selection", choices=["uniform", "fish"], default="uniform",
                        help="uniform: every weight keeps the share of its rows (random); fish: a FISH row budget "
                             "over all of them (layers get unequal shares, as a user's selection does)")
    args = parser.parse_args()
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--clock thread measures one thread's CPU time: use it with --device cpu --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = run(args.device, args.rounds, args.repeats, args.quick,
               clock=CLOCKS[args.clock], selection=args.selection)
    columns = ["model", "row share", "weights with all / some / no rows", "touched rows' share of weight-grad flops",
               "dense backward (s)",
               "row-sparse backward (s)", "compact backward (s)", "no weight grad backward (s)", "backward ratio",
               "weight-grad ratio", "weight-grad ratio, compact"]
    met = [r for r in rows if r["row share"] == 0.25]
    verdict = ", ".join(f"{r['model']}: {r['weight-grad ratio']:.2f} ({r['weight-grad ratio, compact']:.2f} compact)"
                        for r in met)
    command = (f"python -m benchmarks.row_backward --device {args.device} --rounds {args.rounds} --repeats "
               f"{args.repeats}{f' --threads {args.threads}' if args.threads else ''}"
               f"{' --clock thread' if args.clock == 'thread' else ''}{' --quick' if args.quick else ''}"
               f"{' --selection fish' if args.selection == 'fish' else ''}")
    masks = ("every Linear/Conv2d weight keeps the same share of its rows (random, seeded)"
             if args.selection == "uniform" else
             "FISH at granularity=\"row\" over the Linear/Conv2d weights, the share of their elements (the Fisher "
             "of the benchmark's batch; rows ranked across layers, so layers get unequal shares)")
    timed = "backward CPU time of the one thread" if args.clock == "thread" else "backward"
    md = (f"# Row-sparse backward: time against the selected row share\n\nMachine: {machine()}. Command: "
          f"`{command}`; load average at the start {load:.1f}. Train mode; {masks}; best {timed} of "
          f"{args.repeats} runs × {args.rounds} interleaved rounds. *no weight grad*: those weights frozen (the "
          "floor); *compact*: row_sparse(compact=True), the rows' gradient as a sparse tensor of those rows; "
          "*weight-grad ratio*: (row-sparse − floor) / (dense − floor), target ≤ 0.35 at a 25% share.\n\n"
          + md_table(rows, columns) + f"\n\nWeight-grad ratio at a 25% row share: {verdict}.\n")
    name = ("row_backward_quick" if args.quick else "row_backward") + ("_fish" if args.selection == "fish" else "")
    write(name + ("_1thread" if args.threads == 1 and not args.quick else ""), rows, md, args.device)


if __name__ == "__main__":
    main()
