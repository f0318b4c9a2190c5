"""Per-sample Fisher estimation: gradsel's vmap engine against the batch-of-one loop and the batched floor.

Run: ``python -m benchmarks.fisher_speed [--device cuda]``. Writes ``benchmarks/results/fisher_speed{,_cuda}.md``.

Three ways over the same samples, in one process:
- ``batched``: one ordinary forward+backward of the whole batch (no per-sample gradients): the floor;
- ``vmap``: ``gradsel.fisher`` (torch.func, chunked);
- ``loop``: ``gradsel.fisher_loop``, one backward per sample, as the FISH Mask / FISH-Tuning code does it.
Peak memory is measured for the vmap engine at 1× and 4× the samples with the same chunk: it must not grow.
"""

from __future__ import annotations

import argparse

import torch

import gradsel

from .common import PeakMemory, best_time, in_fresh_process, machine, md_table, write
from .models import bert_case, unet_case  # noqa: F401 (ird_cost imports them from here too)


def split(batch, n: int) -> list:
    """A batch cut into a list of batches of ``n`` samples."""
    if isinstance(batch, dict):
        size = len(next(iter(batch.values())))
        return [{k: v[i:i + n] for k, v in batch.items()} for i in range(0, size, n)]
    return [tuple(x[i:i + n] for x in batch) for i in range(0, len(batch[0]), n)]


def _peak_worker(case: str, device: str, batches: int, queue) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _, model, batch, n, _ = globals()[case](device)
    model.eval()
    data = split(batch(batches * n, seed=1), n)
    with PeakMemory(device) as mem:
        gradsel.fisher(model, data, chunk_size=n, progress=False)
    queue.put(mem.mib)


def fresh_process_peak(case: str, device: str, batches: int) -> float:
    """Peak memory of one estimate over ``batches`` batches, in a fresh process (no allocator caches)."""
    return in_fresh_process(_peak_worker, case, device, batches)


def run(device: str = "cpu", repeats: int = 3) -> list[dict]:
    rows = []
    for make in (bert_case, unet_case):
        label, model, batch, n, floor = make(device)
        model.eval()
        b = batch(n)
        params = sum(p.numel() for p in model.parameters())
        t_floor = best_time(lambda: floor(b), repeats, device=device)
        t_vmap = best_time(lambda: gradsel.fisher(model, b, chunk_size=n, progress=False), repeats, device=device)
        t_loop = best_time(lambda: gradsel.fisher_loop(model, b, progress=False), repeats, device=device)
        mem1 = fresh_process_peak(make.__name__, device, 1)
        mem4 = fresh_process_peak(make.__name__, device, 4)
        rows.append({
            "model": label, "params (M)": round(params / 1e6, 1), "batch": n,
            "batched fwd+bwd (s)": t_floor, "vmap (s)": t_vmap, "loop (s)": t_loop,
            "vmap samples/s": n / t_vmap, "loop samples/s": n / t_loop,
            "vmap speed-up over loop": t_loop / t_vmap, "vmap / batched": t_vmap / t_floor,
            "peak MiB, 1x samples": mem1, "peak MiB, 4x samples": mem4,
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = run(args.device, args.repeats)
    cols = ["model", "params (M)", "batch", "batched fwd+bwd (s)", "vmap (s)", "loop (s)", "vmap samples/s",
            "loop samples/s", "vmap speed-up over loop", "vmap / batched", "peak MiB, 1x samples",
            "peak MiB, 4x samples"]
    md = (f"# Fisher estimation speed\n\nMachine: {machine()}. Command: `python -m benchmarks.fisher_speed "
          f"--device {args.device}`. Best of {args.repeats} after a warm-up; eval mode; chunk = batch. "
          "Peak memory is the resident-set growth during one estimate (CUDA: peak allocation), over the "
          "batch and over 4 batches of the same size: the vmap engine's memory is bounded by the chunk.\n\n"
          + md_table(rows, cols) + "\n")
    write("fisher_speed", rows, md, args.device)


if __name__ == "__main__":
    main()
