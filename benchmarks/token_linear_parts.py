"""What a token-axis Linear's per-sample squares cost: ``python -m benchmarks.token_linear_parts``.

The hooks engine forms ``Σ_i g_i²`` of a Linear with a token axis from ``g_i = δ_iᵀ a_i``: one batched matmul
over samples (``torch.bmm``), then each sample's gradient squared into the Fisher (``addcmul_``, one pass).
The floor's backward forms the batch's weight gradient instead, one matmul with every token of the batch as
its inner dimension. This times, for every distinct Linear of the BERT and ViT cases of
``benchmarks.fisher_peers`` (input and output gradient captured from one real batch):

- *batched*: the floor's weight-gradient matmul ``δᵀa`` over all tokens;
- *bmm*: the per-sample gradients, one ``bmm``;
- *squares*: squaring them into the Fisher, one ``addcmul_`` per sample (what the engine does);
- *row blocks*: bmm and squares a block of the weight's rows at a time, the block (all samples) 1 MiB or
  4 MiB, so that it is squared while still in cache (an alternative that was tried).

Writes ``benchmarks/results/token_linear_parts.{md,json}``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .common import best_time, machine, md_table, write
from .models import build


def _captures(name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(layer, input (n, T, K), output gradient (n, T, O))`` of each token-axis Linear, one real batch."""
    case = build(name)
    caps = []
    handles = []
    for lname, m in case.model.named_modules():
        if type(m) is nn.Linear:
            def hook(mod, inputs, out, lname=lname):
                if inputs[0].dim() == 3:
                    out.retain_grad()
                    caps.append((lname, inputs[0].detach(), out))
            handles.append(m.register_forward_hook(hook))
    *inputs, y = case.tensors(seed=0)
    case.losses(case.logits(case.model, *inputs), y).sum().backward()
    for h in handles:
        h.remove()
    return [(lname, a, out.grad.detach()) for lname, a, out in caps]


def _rows_blocked(d: torch.Tensor, a: torch.Tensor, acc: torch.Tensor, block_bytes: int) -> None:
    n, _, out = d.shape
    cols = a.shape[2]
    dt = d.transpose(1, 2)
    acc2 = acc.view(out, cols)
    rows = max(1, block_bytes // (n * cols * 4))
    for r in range(0, out, rows):
        g = torch.bmm(dt[:, r:r + rows], a)
        acc2[r:r + rows].add_(g.square_().sum(0))


def measure(name: str, repeats: int) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for lname, a, d in _captures(name):
        key = (tuple(a.shape), tuple(d.shape))
        if key in groups:
            groups[key]["count"] += 1
            continue
        n, t, k = a.shape
        o = d.shape[2]
        acc = torch.zeros(o * k)
        g = torch.bmm(d.transpose(1, 2), a).reshape(n, -1)

        def squares(g=g, acc=acc):
            for row in g:
                acc.addcmul_(row, row)

        timed = {
            "batched (ms)": lambda: d.reshape(-1, o).T @ a.reshape(-1, k),
            "bmm (ms)": lambda: torch.bmm(d.transpose(1, 2), a),
            "squares (ms)": squares,
            "row blocks 1 MiB (ms)": lambda: _rows_blocked(d, a, acc, 1 << 20),
            "row blocks 4 MiB (ms)": lambda: _rows_blocked(d, a, acc, 4 << 20),
        }
        row = {"model": name, "layer": lname, "count": 1, "samples × tokens": f"{n}×{t}", "weight": f"{o}×{k}"}
        for col, fn in timed.items():
            row[col] = 1e3 * best_time(fn, repeats=repeats)
        groups[key] = row
    return list(groups.values())


def _totals(rows: list[dict]) -> dict:
    cols = ["batched (ms)", "bmm (ms)", "squares (ms)", "row blocks 1 MiB (ms)", "row blocks 4 MiB (ms)"]
    tot = {c: sum(r["count"] * r[c] for r in rows) for c in cols}
    base = tot["batched (ms)"]
    return {"engine ÷ batched": (tot["bmm (ms)"] + tot["squares (ms)"]) / base,
            "bmm ÷ batched": tot["bmm (ms)"] / base, "squares ÷ batched": tot["squares (ms)"] / base,
            "row blocks 1 MiB ÷ batched": tot["row blocks 1 MiB (ms)"] / base,
            "row blocks 4 MiB ÷ batched": tot["row blocks 4 MiB (ms)"] / base, **tot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,vit", help="comma-separated, of bert, vit")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, totals = [], []
    t0 = time.perf_counter()
    for name in args.models.split(","):
        part = measure(name, args.repeats)
        rows += part
        totals.append({"model": name, **_totals(part)})
    command = "python -m benchmarks.token_linear_parts" + (f" --models {args.models}"
                                                            if args.models != "bert,vit" else "")
    lines = ["# A token-axis Linear's per-sample squares against the batched weight gradient", "",
             f"Machine: {machine()}. Command: `{command}` ({time.perf_counter() - t0:.0f} s). Best of "
             f"{args.repeats} calls per layer shape; each shape once, times its count in the totals. See "
             "`benchmarks/token_linear_parts.py`.", "",
             "## Whole network (each layer times its count), ÷ the batched weight gradients", "",
             md_table(totals, ["model", "engine ÷ batched", "bmm ÷ batched", "squares ÷ batched",
                               "row blocks 1 MiB ÷ batched", "row blocks 4 MiB ÷ batched", "batched (ms)"]), "",
             "`engine`: bmm + squares, what the hooks engine runs for these layers.", "",
             "## Layer by layer", "",
             md_table(rows, ["model", "layer", "count", "samples × tokens", "weight", "batched (ms)", "bmm (ms)",
                             "squares (ms)", "row blocks 1 MiB (ms)", "row blocks 4 MiB (ms)"]), ""]
    write("token_linear_parts", {"rows": rows, "totals": totals}, "\n".join(lines))


if __name__ == "__main__":
    main()
