"""What the row-sparse weight gradient costs in each convolution of the Unet: ``python -m benchmarks.row_conv_parts``.

``benchmarks.row_backward`` finds the Unet's weight-gradient part at 0.4-0.6x dense at a 25% row share
(target 0.35x) and still about 0.4x at 10%. This times, on one thread (CPU time of the thread), every distinct
``nn.Conv2d`` of the smp Unet-resnet18 at that benchmark's batch (8, 128×128), on its real input and output
gradient:

- *weight-grad part, dense*: ``convolution_backward`` for the input and weight gradients together, less the
  same call for the input gradient alone (what a dense weight gradient adds to backward);
- *rows (k)*: what :mod:`gradsel.rowsparse` runs for ``k`` selected output channels
  (``conv_rows_weight_grad``): gathering their output-gradient channels, then oneDNN's weight-gradient kernel
  on them or, for a few rows of a stride-1 3×3-or-larger kernel against many input channels, one matmul over
  the kernel taps (``gradsel.rowsparse._by_taps``); k = 25% of the channels, 16 and 2, and each of the two
  paths alone (*oneDNN*, *taps*; taps only for stride 1).

Writes ``benchmarks/results/row_conv_parts.{md,json}``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from gradsel.rowsparse import _by_taps, conv_rows_weight_grad

from .common import CLOCKS, best_time, distinct_convs, machine, md_table, write
from .row_backward import unet


def _times(layer: dict, repeats: int, clock) -> dict:
    m, x, d = layer["module"], layer["x"], layer["d"]
    conf = (m.stride, m.padding, m.dilation, False, [0, 0], m.groups)

    def backward(grad, weight, mask):
        return torch.ops.aten.convolution_backward(grad, x, weight, None, *conf, mask)

    def rows(k, taps=None):
        idx = torch.randperm(d.shape[1], generator=torch.Generator().manual_seed(0))[:k].sort().values
        return lambda: conv_rows_weight_grad(d, x, m.weight, idx, list(m.stride), list(m.padding), list(m.dilation),
                                             taps)

    timed = lambda fn: 1e3 * best_time(fn, repeats=repeats, clock=clock)  # noqa: E731
    both = timed(lambda: backward(d, m.weight, [True, True, False]))
    inp = timed(lambda: backward(d, m.weight, [True, False, False]))
    cout = m.weight.shape[0]
    quarter = max(1, round(cout / 4))
    row = {"layer": layer["layer"], "count": layer["count"], "weight": "×".join(map(str, m.weight.shape)),
           "output": "×".join(map(str, d.shape[2:])), "weight-grad part, dense (ms)": both - inp,
           "rows (25%) (ms)": timed(rows(quarter)), "25% rows": quarter,
           "path (25%)": "taps" if _by_taps(x, m.weight, d[:, :quarter], list(m.stride)) else "oneDNN"}
    row["rows (16) (ms)"] = timed(rows(16)) if cout > 16 else float("nan")
    row["rows (2) (ms)"] = timed(rows(2))
    row["rows (2), oneDNN (ms)"] = timed(rows(2, taps=False))
    stride1 = all(s == 1 for s in m.stride)
    row["rows (2), taps (ms)"] = timed(rows(2, taps=True)) if stride1 else float("nan")
    row["rows (25%), oneDNN (ms)"] = timed(rows(quarter, taps=False))
    row["rows (25%), taps (ms)"] = timed(rows(quarter, taps=True)) if stride1 else float("nan")
    row["25% ÷ dense part"] = row["rows (25%) (ms)"] / row["weight-grad part, dense (ms)"]
    return row


def run(repeats: int = 5) -> list[dict]:
    torch.set_num_threads(1)
    _, model, loss_fn, _ = unet("cpu")
    model.train()
    return [_times(layer, repeats, CLOCKS["thread"]) for layer in distinct_convs(model, lambda: loss_fn().backward())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best is kept)")
    args = parser.parse_args()
    rows = run(args.repeats)
    total = {k: sum(r["count"] * r[k] for r in rows)
             for k in ("weight-grad part, dense (ms)", "rows (25%) (ms)", "rows (25%), oneDNN (ms)")}
    rows.sort(key=lambda r: -r["count"] * r["rows (25%) (ms)"])
    command = "python -m benchmarks.row_conv_parts" + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
    md = (f"# Row-sparse conv weight gradients in the Unet, layer by layer\n\nMachine: {machine()}. Command: "
          f"`{command}`. smp Unet-resnet18, batch 8, 128×128, train mode; one thread, CPU time of the thread, best "
          f"of {args.repeats}. *weight-grad part, dense*: input and weight gradients in one call less the input "
          "gradient alone; *rows (k)*: what `gradsel.rowsparse` runs for k rows (gather their output-gradient "
          "channels, then oneDNN's weight-gradient kernel or, for a few rows of a stride-1 3×3-or-larger kernel "
          "against many input channels, one matmul over the kernel taps: `gradsel.rowsparse._by_taps`), k = 25% of "
          "the channels, 16, 2; *path*: the one it takes at 25%; *oneDNN* / *taps*: that path alone.\n\n"
          f"Over the network (each layer times its count): dense part {total['weight-grad part, dense (ms)']:.1f} ms, "
          f"25% of the rows {total['rows (25%) (ms)']:.1f} ms "
          f"({total['rows (25%) (ms)'] / total['weight-grad part, dense (ms)']:.2f}×; oneDNN alone "
          f"{total['rows (25%), oneDNN (ms)']:.1f} ms, "
          f"{total['rows (25%), oneDNN (ms)'] / total['weight-grad part, dense (ms)']:.2f}×).\n\n"
          + md_table(rows, ["layer", "count", "weight", "output", "weight-grad part, dense (ms)", "25% rows",
                            "path (25%)", "rows (25%) (ms)", "rows (25%), oneDNN (ms)", "rows (25%), taps (ms)",
                            "rows (16) (ms)",
                            "rows (2) (ms)", "rows (2), oneDNN (ms)", "rows (2), taps (ms)", "25% ÷ dense part"])
          + "\n")
    write("row_conv_parts", [{k: v for k, v in r.items()} for r in rows], md)


if __name__ == "__main__":
    main()
