"""What ``Selection.apply`` costs in memory: what the handle holds between steps, and a masked step's peak.

Run: ``python -m benchmarks.apply_memory [--steps 3] [--before SRC]``. Writes
``benchmarks/results/apply_memory.{md,json}``.

Model: the BERT-from-config of ``benchmarks/sparse_memory.py`` (4 layers, hidden 256, 11.2M parameters,
44.9 MB of float32), batch 16 × 64 tokens, ``torch.optim.AdamW(lr=1e-4, weight_decay=0.01)``. Selections:
``random`` (every tensor partly selected: the guard's worst case) at keep 0.5%, 5% and 50%, the new
classifier in full (``always=``). Each configuration runs in a fresh process, large blocks through mmap (so
freed memory leaves the resident set):

- *held bytes*: every tensor reachable from the handle's attributes (and its hooks' closures), minus the
  model's parameters and gradients, the optimizer's state and the selection's own masks; exact.
- *apply RSS*: resident-set growth over ``apply`` (after a garbage collection).
- *peak MiB*: resident-set growth over ``apply`` (masked runs) and ``--steps`` AdamW steps (zero_grad,
  forward, backward, step); the first step allocates AdamW's state. The same without a selection is the
  reference (*peak / unmasked*).

``--before SRC`` runs the same configurations with the gradsel package found in the folder ``SRC`` (e.g. an
older version: ``git archive <commit> gradsel | tar -x -C SRC``) and adds its rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from .common import PeakMemory, _rss_bytes, machine, md_table, write

ROOT = Path(__file__).resolve().parent.parent
KEEPS = (0.005, 0.05, 0.5)


def handle_tensor_bytes(handle, model, optimizer=None) -> int:
    """Bytes of the tensors ``handle`` holds beyond the model's parameters and gradients, the optimizer's
    state and the selection's masks (storages counted once)."""
    import gradsel

    skip = {t.untyped_storage().data_ptr() for t in _tensors_of(model, optimizer, handle.selection.masks)}
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}

    def visit(obj):
        if id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
        elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, gradsel.Selection)):
            return  # the user's objects, or the selection: not the handle's own
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                visit(cell.cell_contents)
        elif type(obj).__module__.startswith("gradsel") and hasattr(obj, "__dict__"):
            visit(vars(obj))

    visit(handle)
    return sum(storages.values())


def _tensors_of(model, optimizer, masks):
    for p in model.parameters():
        yield p
        if p.grad is not None:
            yield p.grad
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
    yield from masks.values()


class _AdamWSubclass(torch.optim.AdamW):
    """An optimizer the guard does not know (it takes a transient copy per step instead)."""


def worker(keep: float | None, steps: int, optimizer: str = "AdamW") -> dict:
    """One configuration, in this (fresh) process."""
    import gradsel

    from .sparse_memory import bert_case

    torch.set_num_threads(1)
    _, model, batch, loss_fn, always = bert_case()
    model.train()
    sel = (gradsel.select(model, None, "random", keep=keep, always=always, progress=False)
           if keep is not None else None)
    cls = torch.optim.AdamW if optimizer == "AdamW" else _AdamWSubclass
    out = {}
    gc.collect()
    with PeakMemory("cpu") as mem:
        opt = cls(model.parameters(), lr=1e-4, weight_decay=0.01)
        if sel is not None:
            gc.collect()
            before = _rss_bytes()
            handle = sel.apply(model, opt)
            gc.collect()
            out["apply RSS MiB"] = (_rss_bytes() - before) / 2**20
            out["held bytes"] = handle_tensor_bytes(handle, model, opt)
            out["held MiB"] = out["held bytes"] / 2**20
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    out["peak MiB"] = mem.mib
    out["param bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return out


def fresh_process(keep, steps, optimizer="AdamW", gradsel_root=None) -> dict:
    """``worker`` in a new interpreter, importing gradsel from ``gradsel_root`` (default: this checkout)."""
    paths = [str(gradsel_root)] if gradsel_root else []
    code = ("import json, sys; sys.path[:0] = " + json.dumps(paths + [str(ROOT)]) +
            "; from benchmarks.apply_memory import worker; "
            f"print('RESULT', json.dumps(worker({keep!r}, {steps}, {optimizer!r})))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run(steps: int, gradsel_root=None, label: str = "after") -> list[dict]:
    rows = []
    configs = [(None, "AdamW")] + [(k, "AdamW") for k in KEEPS] + [(0.005, "AdamW subclass (copy fallback)")]
    if gradsel_root is not None:
        configs = configs[:-1]  # the fallback is this version's
    base = None
    for keep, optimizer in configs:
        out = fresh_process(keep, steps, "AdamW" if optimizer == "AdamW" else "subclass", gradsel_root)
        base = out["peak MiB"] if keep is None else base
        row = {"gradsel": label, "keep": "unmasked" if keep is None else keep, "optimizer": optimizer, **out,
               "peak / unmasked": out["peak MiB"] / base}
        if keep is not None:
            row["held / param bytes"] = out["held bytes"] / out["param bytes"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--before", default=None, help="folder holding an older gradsel package to compare with")
    args = parser.parse_args()
    rows = run(args.steps, args.before, "before") if args.before else []
    rows += run(args.steps)
    torch.set_num_threads(1)  # as in the workers (for the machine line)
    columns = ["gradsel", "keep", "optimizer", "held MiB", "held / param bytes", "apply RSS MiB", "peak MiB",
               "peak / unmasked"]
    md = ("# Selection.apply: memory held between steps and peak of a masked AdamW step\n\n"
          f"Machine: {machine()}. Command: `python -m benchmarks.apply_memory --steps {args.steps}"
          f"{' --before SRC' if args.before else ''}`. BERT 4×256 from config (11.2M parameters), batch 16 × 64, "
          "random selections (every tensor partly selected), classifier in full, AdamW with weight decay 0.01. "
          "Parameters: 42.6 MiB. Method: module docstring.\n\n"
          + md_table(rows, columns) + "\n")
    write("apply_memory", rows, md)


if __name__ == "__main__":
    main()
