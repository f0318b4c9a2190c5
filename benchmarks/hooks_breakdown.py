"""Where the hooks engine's time goes, against the floor (one ordinary batched forward+backward).

Run: ``python -m benchmarks.hooks_breakdown [--models bert,unet,resnet50,vit] [--batches 4] [--name NAME]``.
Writes ``benchmarks/results/hooks_breakdown.md`` (``NAME.md``).

Each model in its own spawned process, float32, eval mode, the configurations of ``fisher_peers``. One
``gradsel.fisher(engine="hooks")`` call over ``--batches`` batches is timed against as many floors,
interleaved, best of ``--repeats`` rounds (and the median of the rounds' ratios), and in the same rounds the
variants of :func:`_variants`: that call with one of the engine's choices undone (a fresh tensor for every
per-sample gradient block instead of the scratch buffer; 32 MiB blocks instead of ``BLOCK_BYTES``). The call
is then repeated with timers around the engine's parts: its forward (``_losses``), its backward
(``torch.autograd.grad``), each per-layer rule that builds the per-sample terms (closed forms for norms and
biases run here), each lazy square-and-sum (``accumulate`` of :class:`~gradsel.fisher.rules.LazyGrads` per
kind) and the squares of plain per-sample tensors. The timers add a little; their sum is set beside the
untimed call.

The floor is split the same way, for comparison with the engine's forward and backward: its forward alone,
and its backward without weight gradients (``torch.autograd.grad`` of the loss with respect to the output of
the first module with parameters only, so autograd forms the activation gradients and nothing else).

A second table takes every convolution of the conv nets once (its real input and output gradient) and
times its batched weight gradient (what the floor's backward computes for it) against gradsel's
per-sample weight gradients squared and summed (:class:`~gradsel.fisher.rules.ConvWeightGrads`, by its
route) and against the other route: the cost of per-sample conv gradients, layer by layer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import statistics
import sys
import time
import warnings
from collections import defaultdict
from typing import Any, Callable

import torch

from .common import (CLOCKS, add_clock_argument, best_time, check_clock, distinct_convs, in_fresh_process_or_fail,
                     machine, md_table, write)

MODELS = ("bert", "unet", "resnet50", "vit")


def _timed(fn: Callable, key: str, spent: dict) -> Callable:
    """``fn`` wrapped so that its wall time adds to ``spent[key]``."""
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0

    return timed


def _timer(owner: Any, attr: str, key: str, spent: dict) -> Callable[[], None]:
    """Time ``owner.attr`` into ``spent[key]``; returns the undo."""
    orig = getattr(owner, attr)
    setattr(owner, attr, _timed(orig, key, spent))
    return lambda: setattr(owner, attr, orig)


def _parts(run: Callable[[], Any]) -> dict[str, float]:
    """One call of ``run`` with timers on the hooks engine's parts."""
    from gradsel.fisher import rules
    from gradsel.fisher.engines import hooks

    estimate = sys.modules["gradsel.fisher.estimate"]
    spent: dict[str, float] = defaultdict(float)
    undo = [_timer(hooks.HooksEngine, "_losses", "forward", spent),
            _timer(torch.autograd, "grad", "backward", spent),
            _timer(estimate, "_accumulate", "squares (all)", spent)]
    lazy = {"OuterSquares": hooks.OuterSquares, "BlockGrads": hooks.BlockGrads,
            "ConvWeightGrads": rules.ConvWeightGrads, "EmbeddingGrads": rules.EmbeddingGrads}
    undo += [_timer(cls, "accumulate", f"squares: {name}", spent) for name, cls in lazy.items()]
    rule_for = hooks._rule_for

    def timed_rule_for(module):  # (rule, min_dim) or None
        found = rule_for(module)
        if found is None:
            return None
        return (_timed(found[0], f"rule: {found[0].__name__.strip('_')}", spent), *found[1:])

    hooks._rule_for = timed_rule_for
    undo.append(lambda: setattr(hooks, "_rule_for", rule_for))
    try:
        t0 = time.perf_counter()
        run()
        spent["total (timed)"] = time.perf_counter() - t0
    finally:
        for u in reversed(undo):
            u()
    spent["squares: plain tensors"] = spent.pop("squares (all)") - sum(v for k, v in spent.items()
                                                                       if k.startswith("squares: "))
    return dict(spent)


def _conv_layers(case) -> list[dict]:
    """Each distinct convolution once: batched weight gradient against the per-sample routes."""
    from gradsel.fisher import rules

    model = case.model.eval()
    x, y = case.tensors(seed=0)
    rows = []
    for layer in distinct_convs(model, lambda: case.losses(case.logits(model, x), y).mean().backward()):
        name, m, xi, d = layer["layer"], layer["module"], layer["x"], layer["d"]
        acc = torch.zeros_like(m.weight, dtype=torch.float32)
        route = rules._conv_route(m, [d])
        scratch = rules.Scratch()  # the engine's reused block buffer (fresh blocks cost page faults, not arithmetic)

        def per_sample(forced=None, m=m, xi=xi, d=d, acc=acc):
            grads = rules.ConvWeightGrads(m, [xi], [d], xi.shape[0], scratch)
            if forced is None:
                return grads.accumulate(acc, False, None, torch.float32)
            orig = rules._conv_route
            rules._conv_route = lambda *_: forced
            try:
                return grads.accumulate(acc, False, None, torch.float32)
            finally:
                rules._conv_route = orig

        batched = best_time(lambda m=m, xi=xi, d=d: torch.ops.aten.convolution_backward(
            d, xi, m.weight, None, m.stride, m.padding, m.dilation, False, [0, 0], m.groups, [False, True, False]))
        other = "kernel" if route == "matmul" else "matmul"
        rows.append({"layer": name, "count": layer["count"], "weight": "×".join(map(str, m.weight.shape)),
                     "output": "×".join(map(str, d.shape[2:])), "stride": m.stride[0], "route": route,
                     "batched (ms)": 1e3 * batched, "gradsel (ms)": 1e3 * best_time(per_sample),
                     "other route (ms)": 1e3 * best_time(lambda: per_sample(other))})
    return rows


def _floor_parts(case, ts: list, repeats: int) -> dict[str, float]:
    """The floor's forward, and its backward without weight gradients, over the batches ``ts`` (seconds)."""
    model = case.model
    first: dict[str, torch.Tensor] = {}

    def hook(mod, inputs, out):
        first.setdefault("out", out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.parameters(False), None) is not None]

    def forward():
        pairs = []
        for *inputs, y in ts:
            first.clear()
            pairs.append((case.losses(case.logits(model, *inputs), y).sum(), first["out"]))
        return pairs

    def forward_backward():
        for loss, out in forward():
            torch.autograd.grad(loss, out)

    try:
        fwd = best_time(forward, repeats=repeats)
        both = best_time(forward_backward, repeats=repeats)
    finally:
        for h in handles:
            h.remove()
    return {"floor: forward": fwd, "floor: backward, no weight gradients": both - fwd}


@contextlib.contextmanager
def _patched(owner: Any, attr: str, value: Any):
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


def _variants() -> dict[str, Callable]:
    """The engine with one of its choices undone, timed in the same rounds: name -> patch (a context manager)."""
    from gradsel.fisher.rules import Scratch
    hooks = importlib.import_module("gradsel.fisher.engines.hooks")
    fresh = lambda self, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    return {"fresh blocks": lambda: _patched(Scratch, "take", fresh),
            "32 MiB blocks": lambda: _patched(hooks, "BLOCK_BYTES", 32 << 20)}


def _worker(model_name: str, batches: int, repeats: int, clock_name: str, queue) -> None:
    warnings.filterwarnings("ignore")
    clock = CLOCKS[clock_name]
    import gradsel

    from .fisher_peers import _data
    from .models import build

    row: dict[str, Any] = {"model key": model_name}
    try:
        case = build(model_name)
        row["model"], row["batch"] = case.label, case.n
        ts = [case.tensors(seed=s) for s in range(batches)]
        floor_case = dataclasses.replace(case, model=copy.deepcopy(case.model))
        floor = lambda: [floor_case.floor(t) for t in ts]  # noqa: E731

        def run():
            return gradsel.fisher(case.model, _data(case, ts), engine="hooks", chunk_size=case.n, progress=False)

        def variant(patch):  # the same call with one of the engine's choices undone
            def call():
                with patch():
                    return run()
            return call

        calls = {"hooks": run, **{name: variant(patch) for name, patch in _variants().items()}}
        floor()
        for c in calls.values():  # a warm-up of each
            c()
        floors, times = [], {name: [] for name in calls}
        for _ in range(repeats):
            floors.append(best_time(floor, repeats=1, warmup=0, clock=clock))
            for name, c in calls.items():
                times[name].append(best_time(c, repeats=1, warmup=0, clock=clock))
        row["floor (s)"] = min(floors)
        for name, got in times.items():
            row[f"{name} (s)"] = min(got)
            row[f"{name} ÷ floor, median of rounds"] = statistics.median(t / f for t, f in zip(got, floors))
        row["parts"] = _parts(run)
        row["floor parts"] = _floor_parts(floor_case, ts, repeats)
        if model_name in ("unet", "resnet50"):
            row["convs"] = _conv_layers(case)
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    queue.put(row)


def _block_mib() -> float:
    """The hooks engine's per-sample block size, in MiB."""
    return importlib.import_module("gradsel.fisher.engines.hooks").BLOCK_BYTES / 2**20


def _timed_calls(row: dict) -> list[str]:
    """The engine and its variants that ``row`` has times for, in the order they ran."""
    return [k[:-len(" (s)")] for k in row if k.endswith(" (s)") and k != "floor (s)"]


def markdown(rows: list[dict], command: str, batches: int, repeats: int, clock: str = "wall") -> str:
    keys = sorted({k for r in rows for k in r.get("parts", {})},
                  key=lambda k: (k.startswith("total"), not k.startswith(("forward", "backward")), k))
    lines = ["# Where the hooks engine's time goes", "",
             f"Machine: {machine()}. Command: `{command}`. Each model in its own process; one fisher() call over "
             f"{batches} batches against {batches} floors, best of {repeats} interleaved rounds "
             f"({'CPU time of the one thread' if clock == 'thread' else 'wall clock'}); then one call "
             "with timers on the engine's parts (÷ floor: the part's seconds over the floor's). See "
             "`benchmarks/hooks_breakdown.py`.", "",
             "## Parts of one call, ÷ floor", ""]
    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append({"model": r.get("model", r["model key"]), "hooks ÷ floor": r["error"]})
            continue
        f = r["floor (s)"]
        out = {"model": r["model"], "floor (s)": r["floor (s)"]}
        for name in _timed_calls(r):
            out[f"{name} ÷ floor"] = r[f"{name} (s)"] / f
            out[f"{name} ÷ floor, median of rounds"] = r[f"{name} ÷ floor, median of rounds"]
        out.update({k: r["parts"].get(k, 0.0) / f for k in keys})
        out.update({k: v / f for k, v in r.get("floor parts", {}).items()})
        table_rows.append(out)
    floor_keys = ["floor: forward", "floor: backward, no weight gradients"]
    names = list(dict.fromkeys(n for r in rows for n in _timed_calls(r)))
    ratios = [f"{name} ÷ floor{m}" for name in names for m in ("", ", median of rounds")]
    lines += [md_table(table_rows, ["model", "floor (s)", *ratios, *keys, *floor_keys]), ""]
    lines += ["`÷ floor`: best call over best floor; `median of rounds`: the median over rounds of each round's "
              "call over that round's floor. The variants are the same call, interleaved with the others, with "
              "one of the engine's choices undone: `fresh blocks`, a new tensor for every per-sample gradient "
              "block instead of the engine's one scratch buffer (`gradsel.fisher.rules.Scratch`); `32 MiB "
              "blocks`, token-axis Linears' per-sample gradients formed 32 MiB at a time (all 16 samples of "
              f"most layers) instead of `BLOCK_BYTES` ({_block_mib():g} MiB, about a core's L2 cache). "
              "`rule: …`: building a layer's per-sample terms (the closed forms of norms and biases are computed "
              "here; the lazy ones only set up); `squares: …`: squaring and summing them into the Fisher; "
              "`total (timed)`: the call with the timers on. `floor: …`: the floor's own forward, and its backward "
              "without weight gradients, to set beside the engine's `forward` and `backward`.", ""]
    for r in rows:
        if not r.get("convs"):
            continue
        convs = r["convs"]
        tot = {k: sum(c["count"] * c[k] for c in convs) for k in ("batched (ms)", "gradsel (ms)", "other route (ms)")}
        lines += [f"## {r['model']}: per-sample conv weight gradients, layer by layer (batch {r['batch']})", "",
                  f"Over the whole network (each layer times its count): batched {tot['batched (ms)']:.1f} ms, "
                  f"gradsel {tot['gradsel (ms)']:.1f} ms ({tot['gradsel (ms)'] / tot['batched (ms)']:.2f}× the batched "
                  f"weight gradients), the other route everywhere {tot['other route (ms)']:.1f} ms.", "",
                  md_table(sorted(convs, key=lambda c: -c["count"] * (c["gradsel (ms)"] - c["batched (ms)"])),
                           ["layer", "count", "weight", "output", "stride", "route", "batched (ms)", "gradsel (ms)",
                            "other route (ms)"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed call (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model process")
    parser.add_argument("--name", default="hooks_breakdown", help="results file name (benchmarks/results/NAME.md)")
    add_clock_argument(parser)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models) or args.batches < 1 or args.repeats < 1:
        parser.error(f"models are of {', '.join(MODELS)}; --batches and --repeats take positive numbers")
    check_clock(parser, args)
    rows = [in_fresh_process_or_fail(_worker, m, args.batches, args.repeats, args.clock, timeout=args.timeout)
            for m in models]
    rows = [r if "model key" in r else {"model key": m, **r} for m, r in zip(models, rows)]
    command = f"python -m benchmarks.hooks_breakdown --models {','.join(models)} --batches {args.batches}"
    if args.repeats != 3:
        command += f" --repeats {args.repeats}"
    if args.name != "hooks_breakdown":
        command += f" --name {args.name}"
    if args.clock != "wall":
        command = f"OMP_NUM_THREADS=1 {command} --clock {args.clock}"
    write(args.name, rows, markdown(rows, command, args.batches, args.repeats, args.clock))


if __name__ == "__main__":
    main()
