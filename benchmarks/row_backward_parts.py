"""Where the row-sparse weight gradient's time goes on BERT: ``python -m benchmarks.row_backward_parts``.

``benchmarks.row_backward`` finds the weight-gradient part of BERT's backward at 0.39-0.41x dense at a 25%
row share (target 0.35x). This splits it, on one thread (CPU time of the thread, the recipes' setting), for
the BERT-from-config of that benchmark with 25% of every Linear's rows:

- *pieces*: ``_RowLinear``'s backward run with a timer around each step, inside real backwards: gathering
  the selected rows' output-gradient columns, the skinny matmul, writing it into a zero gradient of the
  weight's shape, and, for the scale, the dense weight-gradient matmul on the same tensors;
- *the Function itself*: whole backwards with ``_RowLinear`` swapped for two stand-ins, one that forms the
  dense weight gradient (against autograd's dense backward) and one that forms none (against the floor, the
  weights frozen), so the Python ``autograd.Function`` shows apart from the arithmetic.

Writes ``benchmarks/results/row_backward_parts.{md,json}``.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch import nn

from gradsel import rowsparse
from .common import machine, md_table, write
from .row_backward import backward_time, bert, row_masks


def _timed_backward(acc):
    """``_RowLinear.backward`` with a thread-time stopwatch around each step (the dense matmul added for scale)."""
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = ctx.rows
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = g2.mm(weight).view(*grad.shape[:-1], weight.shape[1])
        steps = {}
        t = time.thread_time()
        cols = rowsparse._columns(g2, rows)
        steps["gather the rows' gradient columns"] = time.thread_time() - t
        t = time.thread_time()
        part = cols.t().mm(x2)
        steps["skinny matmul"] = time.thread_time() - t
        t = time.thread_time()
        gw = torch.zeros_like(weight).index_copy_(0, rows, part)
        steps["zero gradient + index_copy_"] = time.thread_time() - t
        t = time.thread_time()
        g2.t().mm(x2)
        steps["dense weight-gradient matmul"] = time.thread_time() - t
        for k, v in steps.items():
            acc[k] += v
        return gx, gw, g2.sum(0) if ctx.has_bias else None, None, None  # no gradient for rows, compact
    return staticmethod(backward)


def _stand_in(dense: bool):
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = g2.mm(weight).view(*grad.shape[:-1], weight.shape[1])
        gw = g2.t().mm(x.reshape(-1, x.shape[-1])) if dense else None
        return gx, gw, g2.sum(0) if ctx.has_bias else None, None, None  # no gradient for rows, compact
    return staticmethod(backward)


def run(rounds: int, repeats: int, share: float = 0.25):
    torch.set_num_threads(1)
    label, model, loss_fn, _ = bert("cpu")
    model.train()
    masks = row_masks(model, share)
    weights = [model.get_submodule(n).weight for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    original = rowsparse._RowLinear.backward

    def whole(kind):
        if kind == "floor":
            for p in weights:
                p.requires_grad_(False)
        try:
            if kind in ("dense", "floor"):
                return backward_time(model, loss_fn, "cpu", repeats, time.thread_time)
            rowsparse._RowLinear.backward = {"row-sparse": original, "Function, dense weight grad": _stand_in(True),
                                             "Function, no weight grad": _stand_in(False)}[kind]
            with rowsparse.row_sparse(model, masks):
                return backward_time(model, loss_fn, "cpu", repeats, time.thread_time)
        finally:
            rowsparse._RowLinear.backward = original
            for p in weights:
                p.requires_grad_(True)

    kinds = ["dense", "floor", "row-sparse", "Function, dense weight grad", "Function, no weight grad"]
    best: dict[str, float] = {}
    pieces: dict[str, float] = {}
    for _ in range(rounds):
        for kind in kinds:
            best[kind] = min(best.get(kind, float("inf")), whole(kind))
        for _ in range(repeats):  # the pieces: best total of one backward
            acc: dict[str, float] = collections.defaultdict(float)
            rowsparse._RowLinear.backward = _timed_backward(acc)
            try:
                with rowsparse.row_sparse(model, masks):
                    model.zero_grad(set_to_none=True)
                    loss_fn().backward()
            finally:
                rowsparse._RowLinear.backward = original
            if not pieces or sum(acc.values()) < sum(pieces.values()):
                pieces = dict(acc)
    part = best["dense"] - best["floor"]
    whole_rows = [{"backward": k, "time (s)": best[k], "weight-grad ratio": (best[k] - best["floor"]) / part}
                  for k in kinds]
    dense_mm = pieces["dense weight-gradient matmul"]
    piece_rows = [{"step": k, "time (s)": v, "share of the dense weight-gradient matmul": v / dense_mm}
                  for k, v in pieces.items()]
    return label, whole_rows, piece_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    label, whole_rows, piece_rows = run(args.rounds, args.repeats)
    md = (f"# Row-sparse weight gradient on BERT: where the time goes\n\nMachine: {machine()}. Command: `python -m "
          f"benchmarks.row_backward_parts --rounds {args.rounds} --repeats {args.repeats}`. {label}, 25% of every "
          "Linear's rows, one torch thread, CPU time of the thread, best of the runs. *weight-grad ratio*: "
          "(backward − floor) / (dense − floor).\n\nWhole backwards:\n\n"
          + md_table(whole_rows, ["backward", "time (s)", "weight-grad ratio"])
          + "\n\nThe row-sparse weight gradient's steps, summed over the 26 Linears of one backward:\n\n"
          + md_table(piece_rows, ["step", "time (s)", "share of the dense weight-gradient matmul"]) + "\n")
    write("row_backward_parts", {"whole": whole_rows, "pieces": piece_rows}, md)


if __name__ == "__main__":
    main()
