"""The diagonal empirical Fisher by gradsel and by its peers, side by side, each method in its own process.

Run: ``python -m benchmarks.fisher_peers [--quick] [--repeats 3] [--batches 1] [--models bert,vit] [--methods opacus,loop]``.
Writes ``benchmarks/results/fisher_peers.{md,json}`` (``--quick`` writes ``fisher_peers_quick.*``, ``--batches N``
with N > 1 ``fisher_peers_batchesN.*``).

``--batches N`` (default 1) times one call over N batches against N floors: for the gradsel engines one
``fisher()`` call over a list of N batches (the steady state of an estimate over a loader: one-time checks
and setup are paid once), for the peers N calls.

Every method computes ``mean_i g_i²``, ``g_i`` the gradient of sample ``i``'s own loss (cross-entropy; the
mean over a segmentation target's pixels), for every parameter of the model:
- ``loop``: ``gradsel.fisher_loop``, one backward per sample (the reference);
- ``gradsel vmap`` / ``gradsel hooks``: ``gradsel.fisher(engine=...)``, one chunk per batch (hooks only
  where this gradsel has that engine);
- ``torch.func vmap``: ``functional_call`` + ``vmap(grad)`` over the whole model and batch, written as a
  user would (BERT gets a 4-D additive attention mask: the 2-D one cannot run under vmap);
- ``opacus``: ``GradSampleModule(loss_reduction="sum")``, ``grad_sample`` squared and summed (in train
  mode, where alone opacus captures activations, with every dropout at p=0);
- ``BackPACK`` / ``BackPACK converter``: ``extend(model[, use_converter=True])`` and ``SumGradSquared``
  on the summed loss;
- ``nngeometry``: ``FIM(..., representation=PMatDiag, variant="regression")`` of the per-sample losses,
  which is the empirical Fisher (its ``classif_logits`` variant is the true Fisher, another quantity).
A method's one-time preparation (wrapping, converting) is not timed.

Each (model, method) runs in a fresh spawned process that
1. times the method and "the floor" (one ordinary batched forward+backward over the same samples, float32)
   interleaved, a warm-up each and then ``repeats`` rounds; the ratio is best method ÷ best floor;
2. measures the resident-set growth (peak MB) of one method call and of one floor call;
3. checks correctness in float64 on a small configuration of the same model: the largest
   ``max|est − loop| / max|loop|`` over tensors, and the tensors a method returns nothing for.
Where a method cannot run a model, the cell shows the first line of its error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

import gradsel

from .common import (CLOCKS, PeakMemory, add_clock_argument, best_time, check_clock, in_fresh_process_or_fail,
                     machine, md_table, write)
from .models import CASES, Case, build

TOLERANCE = 1e-8  # relative to each tensor's largest entry, float64
Run = Callable[[tuple[torch.Tensor, ...]], dict[str, torch.Tensor]]


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (shortened), for a table cell."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return line if len(line) <= 160 else line[:157] + "..."


# ---------------------------------------------------------------------------------------------- methods
# each prepares on a case and returns run(tensors) -> {parameter name: mean over samples of g²}

def _loop(case: Case) -> Run:
    return lambda ts: dict(gradsel.fisher_loop(case.model, _data(case, ts), progress=False))


def _data(case: Case, ts: Any) -> Any:
    """One batch (plain tensors) or a list of them (``--batches``) in the form ``gradsel.fisher`` reads."""
    return [case.as_batch(t) for t in ts] if isinstance(ts, list) else case.as_batch(ts)


def _per_batch(run: Run) -> Run:
    """A peer that takes one batch, over a list of batches (``--batches``): one call per batch."""
    def each(ts):
        if not isinstance(ts, list):
            return run(ts)
        outs = [run(t) for t in ts]
        return {k: sum(o[k] for o in outs) / len(outs) for k in outs[0]}
    return each


def _gradsel(engine: str) -> Callable[[Case], Run]:
    def prepare(case: Case) -> Run:
        from gradsel.fisher.estimate import ENGINES

        if engine not in ENGINES:
            raise RuntimeError(f"this gradsel has no engine={engine!r} (engines: {', '.join(ENGINES)})")
        return lambda ts: dict(gradsel.fisher(case.model, _data(case, ts), engine=engine,
                                              chunk_size=case.n, progress=False))
    return prepare


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D 0/1 attention mask as the 4-D additive mask (N, 1, 1, T) that HF models take as is."""
    keep = mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def _torch_vmap(case: Case) -> Run:
    from torch.func import functional_call, grad, vmap

    model = case.model
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(p, *row):
        call = lambda *a, **k: functional_call(model, (p, buffers), a, k)  # noqa: E731
        rows = [t.unsqueeze(0) for t in row]
        return case.losses(case.logits(call, *rows[:-1]), rows[-1]).sum()

    def run(ts):
        ts = list(ts)
        if case.text:
            ts[1] = _additive_mask(ts[1], next(iter(params.values())).dtype)
        grads = vmap(grad(one), in_dims=(None, *[0] * len(ts)))(params, *ts)
        return {k: g.square().mean(0) for k, g in grads.items()}
    return run


def _opacus(case: Case) -> Run:
    from opacus import GradSampleModule

    # opacus captures activations only in train mode: run it so, with every dropout at p=0 (BatchNorm, which
    # train mode would change, is refused by opacus anyway)
    case.model.train()
    for m in case.model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    wrapped = GradSampleModule(case.model, loss_reduction="sum", batch_first=True)

    def run(ts):
        wrapped.zero_grad(set_to_none=True)  # also drops grad_sample, which opacus would accumulate
        case.losses(case.logits(wrapped, *ts[:-1]), ts[-1]).sum().backward()
        out = {}
        for k, p in case.model.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if gs is not None:
                gs = sum(gs) if isinstance(gs, list) else gs
                out[k] = gs.square().sum(0) / len(ts[-1])
        wrapped.zero_grad(set_to_none=True)  # hold nothing between calls
        return out
    return run


def _backpack(converter: bool) -> Callable[[Case], Run]:
    def prepare(case: Case) -> Run:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared

        names = {id(p): k for k, p in case.model.named_parameters()}
        model = extend(case.model, use_converter=converter)

        def run(ts):
            model.zero_grad(set_to_none=True)
            loss = case.losses(case.logits(model, *ts[:-1]), ts[-1]).sum()
            with backpack(SumGradSquared()):
                loss.backward()
            out = {}
            for p in model.parameters():
                sgs = getattr(p, "sum_grad_squared", None)
                if sgs is not None and id(p) in names:
                    out[names[id(p)]] = sgs / len(ts[-1])
                    del p.sum_grad_squared
            model.zero_grad(set_to_none=True)
            return out
        return run
    return prepare


def _nngeometry(case: Case) -> Run:
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    model = case.model
    layers = LayerCollection.from_model(model)  # raises on a layer with parameters that it has no rule for
    l_to_m, _ = layers.get_layerid_module_maps(model)
    tensors = list(layers.named_parameters(l_to_m))

    def losses(*d):  # the per-sample losses as the "regression" output: F = mean_i ∇ℓ_i ∇ℓ_iᵀ
        return case.losses(case.logits(model, *d[:-1]), d[-1])[:, None]

    def run(ts):
        diag = FIM(model, ts, PMatDiag, variant="regression", function=losses, layer_collection=layers).get_diag()
        out, start = {}, 0
        for k, p in tensors:
            out[k] = diag[start:start + p.numel()].view(p.shape)
            start += p.numel()
        return out
    return run


GRADSEL = ("loop", "gradsel vmap", "gradsel hooks")  # one fisher() call over a list of batches

# name -> (prepare, the package it needs)
METHODS: dict[str, tuple[Callable[[Case], Run], str | None]] = {
    "loop": (_loop, None),
    "gradsel vmap": (_gradsel("vmap"), None),
    "gradsel hooks": (_gradsel("hooks"), None),
    "torch.func vmap": (_torch_vmap, None),
    "opacus": (_opacus, "opacus"),
    "BackPACK": (_backpack(False), "backpack"),
    "BackPACK converter": (_backpack(True), "backpack"),
    "nngeometry": (_nngeometry, "nngeometry"),
}


def installed(method: str) -> bool:
    package = METHODS[method][1]
    return package is None or importlib.util.find_spec(package) is not None


# ---------------------------------------------------------------------------------------------- correctness

def correctness(est: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = TOLERANCE) -> dict:
    """Compare a method's Fisher with the loop's, tensor by tensor.

    Returns ``max_rel_err`` (the largest ``max|est − ref| / max|ref|`` over the tensors it returned,
    ``max|ref|`` floored at 1e-10 of the largest entry of all), ``worst`` (that tensor's name), ``missing`` (names it returned
    nothing for, or a wrong shape), ``ok`` and ``text`` (for the table).
    """
    missing = [k for k in ref if k not in est or est[k].numel() != ref[k].numel()]
    overall = max((r.detach().abs().max().item() for r in ref.values() if r.numel()), default=0.0)
    err, worst = 0.0, None
    for k, r in ref.items():
        if k in missing:
            continue
        r = r.detach().double()
        e = est[k].detach().double().reshape(r.shape)
        # a tensor whose gradient is zero in exact arithmetic (a key bias) holds rounding noise: its scale is
        # floored at 1e-10 of the model's largest entry, as in tests/test_engines.py
        scale = max(r.abs().max().item(), 1e-10 * overall) or 1.0
        rel = (e - r).abs().max().item() / scale
        if rel > err or rel != rel:  # NaN counts as the worst
            err, worst = rel, k
    ok = not missing and err <= tol
    parts = [f"ok ({err:.0e})" if err <= tol else f"**wrong**: {err:.2g} on {worst}"]
    if missing:
        parts.append(f"misses {len(missing)} of {len(ref)} tensors")
    return {"max_rel_err": err, "worst": worst, "missing": missing, "ok": ok, "text": "; ".join(parts)}


def check(model_name: str, method: str) -> dict:
    """The float64 correctness of ``method`` on the small configuration of ``model_name``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # peers that allocate buffers with the default dtype (nngeometry)
    try:
        case = build(model_name, small=True, dtype=torch.float64)
        ts = case.tensors(seed=1)
        ref = dict(gradsel.fisher_loop(case.model, case.as_batch(ts), progress=False))  # before any wrapping
        if method == "loop":
            return {"text": "reference", "ok": True, "max_rel_err": 0.0, "missing": []}
        return correctness(METHODS[method][0](case)(ts), ref)
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------- one process

def _worker(model_name: str, method: str, quick: bool, repeats: int, batches: int, clock_name: str, queue) -> None:
    warnings.filterwarnings("ignore")  # the peers' own warnings (a missing rule shows as missed tensors)
    clock = CLOCKS[clock_name]
    row: dict[str, Any] = {"model key": model_name, "method": method}
    try:
        case = build(model_name, small=quick)
        row["model"], row["batch"] = case.label, case.n
        row["params (M)"] = round(sum(p.numel() for p in case.model.parameters()) / 1e6, 1)
        ts = case.tensors(seed=0) if batches == 1 else [case.tensors(seed=s) for s in range(batches)]
        # the floor runs on its own copy: the peers' hooks on the model would slow it down
        floor_case = dataclasses.replace(case, model=copy.deepcopy(case.model))
        floor = floor_case.floor if batches == 1 else (lambda b: [floor_case.floor(t) for t in b])
        floor(ts)
        floor_case.model.zero_grad(set_to_none=True)  # its peak includes allocating the gradients
        row["floor peak MB"] = _peak(lambda: floor(ts))
        run = METHODS[method][0](case)
        if batches > 1 and method not in GRADSEL:
            run = _per_batch(run)
        t0 = time.perf_counter()
        run(ts)  # warm-up
        row["first call (s)"] = time.perf_counter() - t0
        floors, times = [], []
        for _ in range(repeats):  # interleaved rounds: load on the machine hits both alike
            floors.append(best_time(lambda: floor(ts), repeats=1, warmup=0, clock=clock))
            times.append(best_time(lambda: run(ts), repeats=1, warmup=0, clock=clock))
        row["floor (s)"], row["time (s)"] = min(floors), min(times)
        row["× floor"] = min(times) / min(floors)
        row["peak MB"] = _peak(lambda: run(ts))
    except Exception as exc:  # noqa: BLE001 (a peer that cannot run a model is a result)
        row["error"] = first_line(exc)
    try:
        row["check"] = check(model_name, method)
    except Exception as exc:  # noqa: BLE001
        row["check"] = {"text": "cannot run: " + first_line(exc), "ok": False}
    queue.put(row)


def _peak(fn: Callable[[], Any]) -> float:
    with PeakMemory() as mem:
        fn()
    return mem.mib


# ---------------------------------------------------------------------------------------------- driver

def run(models: list[str], methods: list[str], quick: bool, repeats: int, timeout: float,
        batches: int = 1, clock: str = "wall") -> list[dict]:
    rows, start = [], time.perf_counter()
    tasks = [(m, k) for m in models for k in methods]
    bar = tqdm(tasks, unit="run", desc="peers")
    for model_name, method in bar:
        bar.set_description(f"{model_name}: {method}")
        if not installed(method):
            row = {"model key": model_name, "method": method, "error": f"{METHODS[method][1]} is not installed",
                   "check": {"text": "not installed", "ok": False}}
        else:
            t0 = time.perf_counter()
            row = in_fresh_process_or_fail(_worker, model_name, method, quick, repeats, batches, clock,
                                           timeout=timeout)
            row["process (s)"] = round(time.perf_counter() - t0, 1)
            row.setdefault("model key", model_name)
            row.setdefault("method", method)
            row.setdefault("check", {"text": "-", "ok": False})
        rows.append(row)
        cell = f"{row['× floor']:.2f}× floor, {row['peak MB']:.0f} MB" if "× floor" in row else row.get("error")
        tqdm.write(f"{model_name:9s} {method:19s} {cell} | {row['check']['text']} [{row.get('process (s)', 0)} s]")
    print(f"{len(tasks)} processes in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _check_cell(r: dict) -> str:
    """The correctness part of a grid cell: empty when ok, else what is wrong in a few words."""
    c = r["check"]
    if c.get("ok") or c["text"] == "reference":
        return ""
    if "max_rel_err" not in c:
        return "check: " + c["text"].split(":")[0]
    parts = [] if c["max_rel_err"] <= TOLERANCE else [f"**wrong** ({c['max_rel_err']:.2g} on {c['worst']})"]
    if c.get("missing"):
        parts.append(f"misses {len(c['missing'])} tensors")
    return ", ".join(parts)


def markdown(rows: list[dict], command: str, repeats: int, batches: int = 1, clock: str = "wall") -> str:
    labels = {r["model key"]: r["model"] for r in rows if "model" in r}
    for r in rows:
        r["model"] = labels.get(r["model key"], r["model key"])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    grid, notes = [], []
    for key in dict.fromkeys(r["model key"] for r in rows):
        line = {"model": labels.get(key, key)}
        for r in (r for r in rows if r["model key"] == key):
            if "× floor" in r:
                cell = f"{r['× floor']:.2f}× · {r['peak MB']:.0f} MB"
            else:
                notes.append(f"{len(notes) + 1}. {r['model']}, {r['method']}: {r.get('error', '?')}")
                cell = f"cannot run ({len(notes)})"
            extra = _check_cell(r)
            line[r["method"]] = cell + (", " + extra if extra and "× floor" in r else "")
        grid.append(line)
    long = []
    for r in rows:
        check_text = r["check"]["text"]
        if "error" in r and check_text == "cannot run: " + r["error"]:
            check_text = "cannot run"
        long.append({"model": r["model"], "method": r["method"],
                     "time ÷ floor": r.get("× floor", "-"), "time (s)": r.get("time (s)", "-"),
                     "floor (s)": r.get("floor (s)", "-"), "peak MB": r.get("peak MB", "-"),
                     "floor peak MB": r.get("floor peak MB", "-"), "correctness (float64)": check_text,
                     "failure": r.get("error", ""), "process (s)": r.get("process (s)", "-")})
    return (
        "# The diagonal Fisher: gradsel and the peers, side by side\n\n"
        f"Machine: {machine()}. Command: `{command}`. Each (model, method) in its own spawned process, float32, "
        "eval mode; time" + (" (CPU time of the one thread)" if clock == "thread" else "")
        + f" = best of {repeats} rounds that interleave the method and the floor (one ordinary "
        "batched forward+backward over the same samples), after a warm-up of each; peak MB = resident-set "
        "growth during one call (the floor's beside it)"
        + (f"; each timed call covers {batches} batches (gradsel: one fisher() call over them; peers: one call "
           f"per batch) against {batches} floors" if batches > 1 else "") + ". Correctness: float64 on a small configuration of the "
        f"same model against `gradsel.fisher_loop`, the largest max|est − loop| / max|loop| over tensors "
        f"(ok ≤ {TOLERANCE:g}), and the tensors a method returns nothing for. Preparation (wrapping, "
        "converting) is not timed. See `benchmarks/fisher_peers.py` for how each peer is called.\n\n"
        "## Time ÷ floor · peak MB (correctness where it is not ok)\n\n"
        + md_table(grid, ["model", *methods])
        + "\n\nWhere a method cannot run a model, the first line of its error:\n\n" + "\n".join(notes)
        + "\n\n## All columns\n\n"
        + md_table(long, ["model", "method", "time ÷ floor", "time (s)", "floor (s)", "peak MB", "floor peak MB",
                          "correctness (float64)", "failure", "process (s)"])
        + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configurations and 1 round: checks the columns")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, 1 with --quick)")
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per (model, method) process")
    parser.add_argument("--batches", type=int, default=1,
                        help="batches per timed call (default 1): gradsel's engines take them in one fisher() call")
    add_clock_argument(parser)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in models if m not in CASES] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown model or method: {unknown}")
    if args.batches < 1:
        parser.error("--batches takes a positive number")
    check_clock(parser, args)
    rows = run(models, methods, args.quick, repeats, args.timeout, args.batches, args.clock)
    command = (("OMP_NUM_THREADS=1 " if args.clock == "thread" else "")
               + "python -m benchmarks.fisher_peers" + (" --quick" if args.quick else "")
               + (f" --batches {args.batches}" if args.batches > 1 else "")
               + (f' --models "{args.models}"' if models != list(CASES) else "")
               + (f' --methods "{args.methods}"' if methods != list(METHODS) else "")
               + (f" --clock {args.clock}" if args.clock != "wall" else "")
               + (f" --repeats {args.repeats}" if args.repeats is not None else ""))
    name = "fisher_peers_quick" if args.quick else "fisher_peers"
    name += (f"_batches{args.batches}" if args.batches > 1 else "") + ("_thread" if args.clock == "thread" else "")
    write(name, rows, markdown(rows, command, repeats, args.batches, args.clock))


if __name__ == "__main__":
    main()
