"""What IRD's search costs, as a multiple of one FISH Fisher pass over the same samples and model.

Run: ``python -m benchmarks.ird_cost [--device cuda] [--repeats 2] [--threads 1]``.
Writes ``benchmarks/results/ird_cost{,_cuda}.{md,json}``.

For each model, in one process and on the same batches:
- ``FISH pass``: one ``gradsel.fisher`` over the N samples (what ``select(..., "fish")`` spends on scores);
- ``FISH select``: the whole ``gradsel.select(..., "fish")`` (the pass plus the global top-k);
- ``IRD select``: the whole ``gradsel.select(..., "ird")``, its passes timed one by one (Fisher passes over
  ``S_r``, contribution passes over ``S_r`` with a mask) and the rest (ranking, top-k) left over.
The count of per-sample gradients IRD computes is ``2·Σ_r s_r − s_R`` (``gradsel.policies.ird.plan``); the
time multiple is measured, not derived from it.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import gradsel
import gradsel.policies.ird as ird_module

from .common import best_time, machine, md_table, write
from .fisher_speed import bert_case, split, unet_case


def once(fn, device: str) -> float:
    """Wall time of one call (the rounds interleave FISH and IRD, so each is timed once per round)."""
    return best_time(fn, repeats=1, warmup=0, device=device)


class PassTimer:
    """Wraps the ``fisher`` that ird calls, timing each pass and telling Fisher from contribution passes."""

    def __init__(self, device: str):
        self.device = device
        self.passes: list[tuple[str, int, float]] = []
        self.inner = ird_module.fisher

    def __call__(self, *args, **kwargs):
        kind = "contribution" if kwargs.get("per_sample") is not None else "fisher"
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.passes.append((kind, out.num_samples, time.perf_counter() - t0))
        return out

    def __enter__(self):
        ird_module.fisher = self
        return self

    def __exit__(self, *exc):
        ird_module.fisher = self.inner


def measure(label, model, data, samples, keep, device, repeats) -> dict:
    model.eval()
    opts = dict(keep=keep, progress=False)
    gradsel.fisher(model, data[:1], progress=False)  # warm-up
    best = {"pass": float("inf"), "fish": float("inf"), "ird": float("inf")}
    timer_best = None
    for _ in range(repeats):  # interleaved, so that a busy machine slows all three alike
        best["pass"] = min(best["pass"], once(lambda: gradsel.fisher(model, data, progress=False), device))
        best["fish"] = min(best["fish"], once(lambda: gradsel.select(model, data, "fish", **opts), device))
        with PassTimer(device) as timer:
            holder = {}
            t = once(lambda: holder.setdefault("sel", gradsel.select(model, data, "ird", **opts)), device)
        if t < best["ird"]:
            best["ird"], timer_best, sel = t, timer, holder["sel"]
    info = sel.info
    fisher_s = sum(t for kind, _, t in timer_best.passes if kind == "fisher")
    contrib_s = sum(t for kind, _, t in timer_best.passes if kind == "contribution")
    expected = ird_module.plan(samples, sel.total(), sel.budget)
    assert info["sample_gradients"] == expected["sample_gradients"]
    row = {
        "model": label, "params (M)": round(sel.total() / 1e6, 2), "samples N": samples, "keep": keep,
        "rounds": len(info["rounds"]),
        "samples per round": " → ".join(str(r["samples"]) for r in info["rounds"]),
        "sample-gradients / N": info["fisher_passes"],
        "FISH pass (s)": best["pass"], "FISH select (s)": best["fish"], "IRD select (s)": best["ird"],
        "IRD Fisher passes (s)": fisher_s, "IRD contribution passes (s)": contrib_s,
        "IRD other (s)": best["ird"] - fisher_s - contrib_s,
        "IRD / FISH pass": best["ird"] / best["pass"], "IRD / FISH select": best["ird"] / best["fish"],
        "passes": [{"kind": k, "samples": n, "seconds": t} for k, n, t in timer_best.passes],
    }
    print({k: v for k, v in row.items() if k != "passes"}, flush=True)
    return row


def run(device: str = "cpu", repeats: int = 2, samples: int = 256, keep: float = 0.002) -> list[dict]:
    rows = []
    label, model, batch, n, _ = bert_case(device)
    rows.append(measure(label + f", keep {keep}", model, split(batch(samples, seed=1), n), samples, keep, device,
                        repeats))
    label, model, batch, n, _ = unet_case(device, size=64)
    unet_samples = samples // 2
    rows.append(measure(label + f", keep {keep}", model, split(batch(unet_samples, seed=1), n), unet_samples, keep,
                        device, repeats))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.002)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps a machine shared with other jobs from oversubscribing)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = run(args.device, args.repeats, args.samples, args.keep)
    cols = ["model", "params (M)", "samples N", "rounds", "samples per round", "sample-gradients / N",
            "FISH pass (s)", "FISH select (s)", "IRD select (s)", "IRD Fisher passes (s)",
            "IRD contribution passes (s)", "IRD other (s)", "IRD / FISH pass", "IRD / FISH select"]
    md = (f"# IRD: search cost against one FISH pass\n\nMachine: {machine()}. Command: `python -m benchmarks.ird_cost "
          f"--device {args.device} --repeats {args.repeats} --samples {args.samples} --keep {args.keep}"
          f"{f' --threads {args.threads}' if args.threads else ''}`. Load average at the start: {load:.1f}. "
          f"Best of {args.repeats}, the three measurements interleaved; eval mode; default chunking; "
          "`min_samples=16`, halving fractions 0.5. `sample-gradients / N` is IRD's count of per-sample "
          "gradients over N, `(2·Σ_r s_r − s_R)/N`; the time multiples are measured. \"IRD other\" is the "
          "ranking between passes (top-k within the current element range, sample ranking) and the check that "
          "both passes of a round saw the same data.\n\n"
          + md_table(rows, cols) + "\n")
    write("ird_cost", rows, md, args.device)


if __name__ == "__main__":
    main()
