"""Shared recipe plumbing: configs, isolated runs, aggregation, tables and plots."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import importlib.util
import json
import math
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gradsel.errors import GradselError
from gradsel.report import table


def package_dir(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cycle(batches):
    """Batches without end: ``batches`` is iterated again each time it runs out."""
    while True:
        yield from batches


def load_config(path_or_name: str, configs_dir: Path) -> tuple[str, dict]:
    """Read a YAML config by path, or by name from ``configs_dir`` (``smoke``, ``demo``, ``full``)."""
    import yaml

    path = Path(path_or_name)
    if not path.exists():
        path = configs_dir / f"{path_or_name}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in configs_dir.glob("*.yaml"))
        raise GradselError(f"no config {path_or_name!r}: give a YAML path or one of {names}")
    return path.stem, yaml.safe_load(path.read_text())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-memory growth (MiB) over a block, sampled every 5 ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss())
                time.sleep(0.005)

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def run_jobs(fn: Callable[..., dict], jobs: list[tuple], isolate: bool) -> list[dict]:
    """Run ``fn(*job)`` for each job; with ``isolate``, each in a fresh process (honest peak memory)."""
    if not isolate:
        return [fn(*job) for job in jobs]
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed tensors leave the resident set
    rows = []
    ctx = mp.get_context("spawn")
    for job in jobs:
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rows.append(pool.submit(fn, *job).result())
    return rows


def run_all(fn: Callable[..., dict], jobs: list[tuple], isolate: bool, out: Path, describe: Callable[[dict], str],
            resume: bool = False) -> list[dict]:
    """Run every ``(method, seed, …)`` job through :func:`run_jobs`, one at a time, keeping each finished run
    in ``out/jobs/<method>_seed<seed>.json`` and the table so far in ``out/runs.csv``. With ``resume`` a job
    whose file exists is read back instead of run again (a long run stopped half-way goes on where it was).

    Each job is ``(cfg, method, seed, *rest)``; ``describe(row)`` is the line printed after each run."""
    done = out / "jobs"
    done.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, job in enumerate(jobs):
        method, seed = job[1], job[2]
        path = done / f"{method}_seed{seed}.json"
        if resume and path.exists():
            rows.append(json.loads(path.read_text()))
            print(f"[{i + 1}/{len(jobs)}] {method} seed {seed}: kept from {path}", flush=True)
        else:
            rows += run_jobs(fn, [job], isolate)
            dump_json(rows[-1], path)
            print(f"[{i + 1}/{len(jobs)}] {describe(rows[-1])}", flush=True)
        write_csv(rows, out / "runs.csv")
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict], metrics: list[str], keep: list[str]) -> list[dict]:
    """One row per method: ``keep`` columns from the first run, mean and std of each metric."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["method"], {"method": r["method"], "_runs": []})["_runs"].append(r)
    result = []
    for method, agg in out.items():
        runs = agg.pop("_runs")
        row = {"method": method, "seeds": len(runs)}
        for k in keep:
            row[k] = runs[0].get(k)
        for m in metrics:
            row[m], row[m + " std"] = mean_std([r.get(m) for r in runs])
        row["masked unchanged"] = all(r.get("masked unchanged", True) for r in runs)
        result.append(row)
    return result


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def wall_note(wall: float, rows: list[dict]) -> str:
    """This call's wall time and the runs' own, which differ when --resume rebuilt the summary from saved jobs."""
    runs = sum(float(r.get("run time (s)", 0.0)) for r in rows)
    return f"wall time {wall:.0f} s (the runs' own time summed: {runs:,.0f} s)"


def summary_table(agg: list[dict], columns: list[tuple[str, str, Callable[[dict], Any]]], markdown: bool) -> str:
    rows = [{title: fn(r) for title, _, fn in columns} for r in agg]
    return table(rows, [title for title, _, _ in columns], markdown=markdown)


def plot_xy(agg: list[dict], x: str, y: str, path: Path, *, xlabel: str, ylabel: str, title: str,
            logx: bool = True) -> None:
    """Scatter of ``y`` (mean ± std) against ``x`` per method, one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, r in enumerate(agg):
        if r.get(x) in (None, 0) or r.get(y) is None or math.isnan(r[y]):
            continue
        ax.errorbar([r[x]], [r[y]], yerr=[r.get(y + " std", 0.0)], fmt="o", capsize=4, color=f"C{i % 10}",
                    label=r["method"])
        ax.annotate(r["method"], (r[x], r[y]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dump_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))


def trainable_count(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                    cache: dict | None = None) -> int:
    """Elements that training can change: requires_grad parameters, counted through their masks.

    ``cache`` (a dict the caller keeps between calls) remembers each mask's count until the mask changes (its
    ``_version``, which in-place edits such as jsdrift's freezes bump), so counting every step costs no
    pass over the masks: summing MiniLM's 22.7M mask elements took 0.12 s, a fifth of a jsdrift step.
    """
    masks = masks or {}
    total = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if n not in masks:
            total += p.numel()
            continue
        m = masks[n]
        seen = cache.get(n) if cache is not None else None
        if seen is None or seen[0] is not m or seen[1] != m._version:  # holding m: its id is not reused
            seen = (m, m._version, int(m.sum()))
            if cache is not None:
                cache[n] = seen
        total += seen[2]
    return total


def frozen_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], trainable: dict[str, Any]) -> tuple[bool, int]:
    """Whether every element outside ``trainable`` (name → True or bool mask) is bit-for-bit as ``before``,
    and how many elements changed in all."""
    ok, changed = True, 0
    for n, p in model.named_parameters():
        now = p.detach()
        diff = now != before[n]
        changed += int(diff.sum())
        t = trainable.get(n)
        if t is True:
            continue
        frozen = ~t if isinstance(t, torch.Tensor) else torch.ones_like(diff)
        if bool((diff & frozen.to(diff.device)).any()):
            ok = False
    return ok, changed


class MovementCheck:
    """Checks, step by step, that no element which was frozen or masked during a step moved in it.

    ``masks()`` gives the masks in effect (they may change between steps, as jsdrift's do); parameters
    that do not require grad count as wholly masked.
    """

    def __init__(self, model: torch.nn.Module, masks: Callable[[], dict]):
        self.model = model
        self.masks = masks
        self.ok = True
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.changed = 0

    def before_step(self) -> None:
        self._prev = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        current = self.masks()
        self._frozen = {n: (~current[n] if n in current else torch.zeros_like(p, dtype=torch.bool))
                        if p.requires_grad else torch.ones_like(p, dtype=torch.bool)
                        for n, p in self.model.named_parameters()}

    def after_step(self) -> None:
        changed = 0
        for n, p in self.model.named_parameters():
            moved = p.detach() != self._prev[n]
            if bool((moved & self._frozen[n].to(moved.device)).any()):
                self.ok = False
        for n, p in self.model.named_parameters():
            changed += int((p.detach() != self.start[n]).sum())
        self.changed = changed


def override(cfg: dict, *, max_steps: int | None = None, seeds: list[int] | None = None,
             steps_key: str = "max_steps") -> dict:
    """Apply the command line's sizing overrides to a loaded config in place: ``training[steps_key]`` and
    ``seeds`` (for short measurement runs of a long config)."""
    if max_steps is not None:
        if max_steps < 1:
            raise GradselError(f"--max-steps must be a positive number of steps, got {max_steps}")
        cfg["training"][steps_key] = max_steps
    if seeds is not None:
        if not seeds:
            raise GradselError("--seeds needs at least one seed")
        cfg["seeds"] = list(seeds)
    return cfg


def jsdrift_options(cfg: dict, method: str = "jsdrift", default: dict | None = None) -> dict:
    """``jsdrift:`` of the config (``default`` when it has none), updated by ``jsdrift_variants.<method>``."""
    base = cfg.get("jsdrift") or dict(default or {})
    return {**base, **(cfg.get("jsdrift_variants") or {}).get(method, {})}


def method_names(cfg: dict, builtin: list[str]) -> list[str]:
    """Every method name a config may run: ``builtin`` and its ``jsdrift_variants`` (each named ``jsdrift_*``)."""
    variants = list(cfg.get("jsdrift_variants") or {})
    bad = [v for v in variants if not v.startswith("jsdrift_") or v in builtin]
    if bad:
        raise GradselError(f"jsdrift_variants {bad}: a variant's name must start with 'jsdrift_' (it is a method "
                           f"name) and must not be a built-in method ({', '.join(builtin)})")
    return builtin + variants
