"""Shared helpers for the benchmarks: timing, peak memory, machine description, result files."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at entry (CPU), or CUDA peak allocation on a GPU."""

    def __init__(self, device: str = "cpu", interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def in_fresh_process(target: Callable, *args: Any) -> Any:
    """``target(*args, queue)`` in a spawned process; returns what it put on the queue.

    The child starts with large blocks going through mmap, so that freed tensors leave the resident set and
    its peak RSS shows the live peak, not the allocator's caches. A child that dies raises.
    """
    value = in_fresh_process_or_fail(target, *args)
    if isinstance(value, dict) and set(value) == {"error"}:
        raise RuntimeError(f"{getattr(target, '__name__', target)}: {value['error']}")
    return value


#: ``wall``: the wall clock; ``thread``: CPU time of the calling thread (with one torch thread a CPU call runs
#: on it, autograd's backward included), which time slices lost to other jobs on a shared VM do not inflate
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def add_clock_argument(parser) -> None:
    """``--clock wall|thread`` on a benchmark's command line; check it with :func:`check_clock`."""
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="thread: the timed rounds read the calling thread's CPU time (needs OMP_NUM_THREADS=1)")


def check_clock(parser, args) -> None:
    """Refuse ``--clock thread`` unless torch runs one thread (other threads' work would go uncounted)."""
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread times one thread's CPU time: run with OMP_NUM_THREADS=1")


def distinct_convs(model: torch.nn.Module, backward: Callable[[], Any]) -> list[dict]:
    """Every distinct ``nn.Conv2d`` of ``model`` once, as ``backward()`` (a forward and backward of the model)
    sees it: ``{"layer", "count", "module", "x": its input, "d": its output gradient}``; ``count``: the
    convolutions of that weight shape, input shape, stride, padding and groups."""
    caps = {}

    def hook(mod, inputs, out):
        out.retain_grad()
        caps[mod] = (inputs[0].detach(), out)

    names = {m: n for n, m in model.named_modules() if type(m) is torch.nn.Conv2d}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        backward()
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, dict] = {}
    for m, (x, out) in caps.items():
        key = (tuple(m.weight.shape), tuple(x.shape), m.stride, m.padding, m.groups)
        if key in groups:
            groups[key]["count"] += 1
        else:
            groups[key] = {"layer": names[m], "count": 1, "module": m, "x": x, "d": out.grad}
    return list(groups.values())


def best_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: str = "cpu",
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Smallest time of ``repeats`` calls after ``warmup`` calls, by ``clock`` (the wall clock by default)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return min(times)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    tuned = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k == "LD_PRELOAD"]
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{os.cpu_count()} cores, torch {torch.__version__}" + (f", allocator set by {' '.join(tuned)}" if tuned
                                                                    else ""))


def write(name: str, rows: Any, markdown: str, device: str = "cpu") -> Path:
    """Write ``results/<name>[_<device kind>].{json,md}`` (no suffix on the CPU), print the markdown and
    where it went; return the markdown path."""
    if device != "cpu":
        name += "_" + device.split(":")[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    print(markdown)
    print(f"written to {path}")
    return path


def md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def in_fresh_process_or_fail(target: Callable, *args: Any, timeout: float | None = None) -> Any:
    """Like :func:`in_fresh_process`, but a child that dies or runs past ``timeout`` seconds gives
    ``{"error": "<why>"}`` instead of hanging the parent."""
    import queue as queue_module

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            value = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # what it put just before exiting may still be on its way
                    value = queue.get(timeout=2.0)
                except queue_module.Empty:
                    value = {"error": f"the process died (exit code {proc.exitcode})"}
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                value = {"error": f"ran past the {timeout:.0f} s limit"}
                break
    proc.join()
    return value
