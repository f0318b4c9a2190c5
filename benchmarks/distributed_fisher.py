"""The Fisher across processes: time and bytes communicated per sample, 1 vs 2 processes; masked DDP steps.

Run: ``python -m benchmarks.distributed_fisher [--samples 64] [--steps 10] [--device cuda]``. Writes
``benchmarks/results/distributed_fisher{,_cuda}.{json,md}``.

- ``fisher``: ``gradsel.fisher`` over the same global samples, in one process (no process group) and in
  ``world`` processes (gloo on the CPU, NCCL on GPUs; a DistributedSampler gives each rank its part). Time is
  the slowest rank's best of ``--repeats``; bytes are what one rank hands to the collectives, counted by
  wrapping ``torch.distributed``'s collective functions (all-reduce, all-gather, broadcast, ...).
- ``step``: one training step (forward, backward, SparseAdamW over a 0.5% random selection, head in full)
  with the same per-rank batch, in one process and under DDP; bytes per step are DDP's gradient buckets
  (counted through a comm hook that calls torch's default all-reduce hook).

- ``fsdp`` (case ``bert-fsdp``, 2+ processes only): ``gradsel.fisher`` on the BERT sharded with FSDP2
  (``fully_shard`` on each encoder layer, then the root): time, the bytes gradsel reduce-scatters per rank
  (``ShardedFisher.stats``), every collective's bytes including FSDP2's own parameter all-gathers, the
  largest full-shape sums held at once (one unit's), and the Fisher shard each rank keeps.

Models: a BERT from config (4 layers, hidden 256, vocab 30522: ~11M parameters, as in fisher_speed) and the
tests' Unet (``tests/models.py``: resnet18 encoder, depth 3). On a loaded machine the times mean little:
the bytes are exact.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from .common import machine, md_table, write

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_gather_single",
               "all_to_all_single", "reduce", "gather", "scatter")


# -- counting the bytes handed to the collectives ------------------------------------------------------------

class Counter:
    """Wraps ``torch.distributed``'s collectives while active; counts calls and the bytes this rank sends
    (the input tensor of each collective; for a list input, the sum)."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self._saved: dict = {}

    @staticmethod
    def _sent(name: str, args: tuple, kwargs: dict) -> int:
        if name == "all_gather":  # all_gather(output_list, tensor)
            t = args[1] if len(args) > 1 else kwargs["tensor"]
        elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter_single",
                      "all_gather_single", "all_to_all_single"):
            t = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_tensor"))
        elif name == "scatter":
            t = args[1] if len(args) > 1 else kwargs.get("scatter_list")
        else:
            t = args[0] if args else kwargs["tensor"]
        if isinstance(t, (list, tuple)):
            return sum(x.numel() * x.element_size() for x in t)
        return 0 if t is None else t.numel() * t.element_size()

    def __enter__(self):
        import torch.distributed as dist

        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:  # the *_single collectives: newer torch only
                continue
            self._saved[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                self.calls += 1
                self.bytes += self._sent(_name, args, kwargs)
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}


# -- the models ---------------------------------------------------------------------------------------------

def bert_case(device, samples: int, seq: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, num_labels=2, attn_implementation="eager")
    model = BertForSequenceClassification(config).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (samples, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (samples,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    rows = [{"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": torch.tensor(i % 2)}
            for i in range(samples)]

    def loss(model, batch):
        return model(**batch).loss

    return f"BERT (4 layers, hidden 256), seq {seq}", model, rows, "classifier.*", loss


def unet_case(device, samples: int, size: int):
    sys.path.insert(0, str(ROOT))
    from tests import models as M

    model = M.unet().to(device)
    x, y = M.unet_batch(n=samples, size=size, seed=0)
    rows = [(x[i], y[i]) for i in range(samples)]

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return f"tests' Unet-resnet18 (depth 3), {size}×{size}", model, rows, "segmentation_head.*", loss


def collate(device):
    def fn(rows):
        if isinstance(rows[0], dict):
            return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
        return tuple(torch.stack(c).to(device) for c in zip(*rows))
    return fn


# -- one process of a run -----------------------------------------------------------------------------------

def _timed(fn, repeats: int, barrier) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        fn()
        barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def _run(rank: int, world: int, port: int, case: str, opts: dict, device_kind: str) -> dict:
    from torch.utils.data import DataLoader, DistributedSampler

    import gradsel

    threads = opts["threads"] or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if device_kind == "cuda" else (lambda: None)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=opts["timeout"]))
        barrier = lambda: (sync(), dist.barrier())  # noqa: E731
    else:
        barrier = sync
    try:
        fsdp = case.endswith("-fsdp")
        case = case.removesuffix("-fsdp")
        size = opts["seq"] if case == "bert" else opts["size"]
        label, model, rows, head, loss = globals()[f"{case}_case"](device, opts["samples"], size)
        if fsdp:
            return _run_fsdp(model, rows, label, opts, device, barrier, world, rank)
        n_params = sum(p.numel() for p in model.parameters())
        sampler = DistributedSampler(rows, world, rank, shuffle=False) if world > 1 else None
        loader = DataLoader(rows, batch_size=opts["batch"], sampler=sampler, collate_fn=collate(device))
        out = {"label": label, "params": n_params}

        counter = Counter()
        with counter:
            result = gradsel.fisher(model, loader, progress=False)  # counted once, outside the timing
        out["fisher_samples"] = result.num_samples
        out["fisher_bytes"] = counter.bytes
        out["fisher_collectives"] = counter.calls
        out["fisher_s"] = _timed(lambda: gradsel.fisher(model, loader, progress=False), opts["repeats"], barrier)

        # a masked training step: SparseAdamW over a random 0.5% selection (head in full), same per-rank batch
        # parameters the forward never uses (the tests' Unet keeps the encoder stages that depth 3 skips) must
        # stay out of DDP: select among the used ones, the optimizer freezes the rest
        model.zero_grad(set_to_none=True)
        loss(model, collate(device)(rows[:2])).backward()
        used = [n for n, p in model.named_parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        sel = gradsel.select(model, None, "random", keep=0.005, params=used, always=head, seed=0, progress=False)
        opt = sel.optimizer(model, lr=1e-4)  # before DDP: tensors with nothing selected stay out of its buckets
        model.train()
        net = model
        if world > 1:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device_kind == "cuda" else None)
            net.register_comm_hook(None, default_hooks.allreduce_hook)  # torch's default, through Python: counted
        batch = collate(device)(rows[rank * opts["batch"]:(rank + 1) * opts["batch"]] or rows[:opts["batch"]])

        def step():
            opt.zero_grad(set_to_none=True)
            loss(net, batch).backward()
            opt.step()

        step()
        counter = Counter()
        with counter:
            step()
        out["step_bytes"] = counter.bytes
        out["step_collectives"] = counter.calls
        out["dense_grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["trained_tensor_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        out["step_s"] = _timed(step, opts["steps"], barrier)
        return out
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_fsdp(model, rows, label, opts, device, barrier, world, rank) -> dict:
    """The Fisher on the BERT sharded by FSDP2 (each encoder layer a unit, then the root)."""
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, DistributedSampler

    import gradsel

    n_params = sum(p.numel() for p in model.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    sampler = DistributedSampler(rows, world, rank, shuffle=False)
    loader = DataLoader(rows, batch_size=opts["batch"], sampler=sampler, collate_fn=collate(device))
    counter = Counter()
    with counter:
        result = gradsel.fisher(model, loader, progress=False)
    return {"label": label, "params": n_params, "fisher_samples": result.num_samples,
            "gradsel_bytes": result.stats["bytes"], "gradsel_collectives": result.stats["collectives"],
            "all_bytes": counter.bytes, "all_collectives": counter.calls, "unit_bytes": result.stats["full_bytes"],
            "shard_bytes": sum(t.numel() * t.element_size() for t in result.values()), "fisher_full_bytes": full_bytes,
            "fisher_s": _timed(lambda: gradsel.fisher(model, loader, progress=False), opts["repeats"], barrier)}


def _entry(rank, world, port, case, opts, device_kind, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        queue.put((rank, _run(rank, world, port, case, opts, device_kind)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(case: str, world: int, opts: dict, device_kind: str) -> list[dict]:
    """``world`` spawned processes (one for world 1: the same start-up as the others); results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, case, opts, device_kind, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + opts["timeout"]
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, value = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that the workers still live
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                continue
            results[rank] = value
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [v["error"] for v in results.values() if "error" in v]
    if errors or len(results) < world:
        raise RuntimeError(f"{case}, {world} process(es) failed: " + ("\n".join(errors) or "timed out / died"))
    return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="global samples per Fisher estimate")
    parser.add_argument("--batch", type=int, default=8, help="batch size per rank (Fisher and step)")
    parser.add_argument("--seq", type=int, default=64, help="BERT sequence length")
    parser.add_argument("--size", type=int, default=64, help="Unet image side")
    parser.add_argument("--repeats", type=int, default=2, help="timed Fisher estimates (best kept)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / world)")
    parser.add_argument("--cases", default="bert,unet,bert-fsdp")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before its workers are killed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--name", default="distributed_fisher", help="results file name (a smoke run: another)")
    args = parser.parse_args()
    opts = {k: getattr(args, k) for k in ("samples", "batch", "seq", "size", "repeats", "steps", "threads", "timeout")}
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda":  # NCCL: one GPU per rank
        worlds = [w for w in worlds if w <= torch.cuda.device_count()]

    fisher_rows, step_rows, fsdp_rows = [], [], []
    for case in args.cases.split(","):
        for world in worlds:
            if case.endswith("-fsdp") and world == 1:
                continue  # FSDP2 needs a process group: the one-process row is the plain case's
            ranks = run(case, world, opts, args.device)
            r0 = ranks[0]
            if case.endswith("-fsdp"):
                assert all(r["fisher_samples"] == args.samples for r in ranks), [r["fisher_samples"] for r in ranks]
                fsdp_rows.append({"model": r0["label"], "params": r0["params"], "processes": world,
                                  "samples": args.samples, "fisher s": max(r["fisher_s"] for r in ranks),
                                  "ms / sample": 1e3 * max(r["fisher_s"] for r in ranks) / args.samples,
                                  "gradsel MB sent / rank": max(r["gradsel_bytes"] for r in ranks) / 2**20,
                                  "all collectives MB / rank": max(r["all_bytes"] for r in ranks) / 2**20,
                                  "largest unit sums MB": max(r["unit_bytes"] for r in ranks) / 2**20,
                                  "Fisher shard MB / rank": max(r["shard_bytes"] for r in ranks) / 2**20,
                                  "full Fisher MB": r0["fisher_full_bytes"] / 2**20})
                print(fsdp_rows[-1], flush=True)
                continue
            assert all(r["fisher_samples"] == args.samples for r in ranks), [r["fisher_samples"] for r in ranks]
            common = {"model": r0["label"], "params": r0["params"], "processes": world}
            fisher_rows.append({**common, "samples": args.samples,
                                "fisher s": max(r["fisher_s"] for r in ranks),
                                "ms / sample": 1e3 * max(r["fisher_s"] for r in ranks) / args.samples,
                                "bytes sent / rank": max(r["fisher_bytes"] for r in ranks),
                                "bytes / sample": max(r["fisher_bytes"] for r in ranks) / args.samples,
                                "collectives": r0["fisher_collectives"]})
            step_rows.append({**common, "setup": "single process" if world == 1 else f"DDP, {world} ranks",
                              "batch / rank": args.batch, "step ms": 1e3 * max(r["step_s"] for r in ranks),
                              "all-reduced MB / step": max(r["step_bytes"] for r in ranks) / 2**20,
                              "trained tensors MB": r0["trained_tensor_bytes"] / 2**20,
                              "all parameters MB": r0["dense_grad_bytes"] / 2**20})
            print(fisher_rows[-1], step_rows[-1], flush=True)

    backend = "NCCL" if args.device == "cuda" else "gloo"
    md = [f"# Fisher across processes ({backend})", "",
          f"Machine: {machine()}. Command: `python -m benchmarks.distributed_fisher "
          + " ".join(a for a in sys.argv[1:]) + "`.", ""]
    if fisher_rows:  # the replicated (DDP-style) path
        md += ["## Fisher estimate", "",
          "Time: the slowest rank's best estimate over the same global samples. Bytes: what one rank hands to the "
          "collectives per estimate (Fisher sums in float32 buckets, the counts' all-gather, the mask check is not "
          "part of it); the sums travel once, whatever the number of samples.", "",
          md_table(fisher_rows, ["model", "params", "processes", "samples", "fisher s", "ms / sample",
                                 "bytes sent / rank", "bytes / sample", "collectives"]), "",
          "## Masked training step (SparseAdamW, random 0.5% + head)", "",
          "Same batch per rank; DDP all-reduces the gradient of every tensor with at least one selected element "
          "(element masks save optimizer memory, not communication); tensors with nothing selected were frozen "
          "before wrapping and stay out of the buckets.", "",
          md_table(step_rows, ["model", "setup", "batch / rank", "step ms", "all-reduced MB / step",
                               "trained tensors MB", "all parameters MB"]), ""]
    if fsdp_rows:
        md += ["## Fisher on an FSDP2-sharded model (gradsel.fsdp)", "",
               "The BERT under fully_shard (each encoder layer a unit, then the root). gradsel MB: the sums it "
               "reduce-scatters, one unit at a time, every chunk (plus small flags); all collectives: also FSDP2's "
               "own parameter all-gathers in forward and backward (counted through torch.distributed's functions). No rank holds more of the Fisher than its shard "
               "and one unit's full-shape sums.", "",
               md_table(fsdp_rows, ["model", "params", "processes", "samples", "fisher s", "ms / sample",
                                    "gradsel MB sent / rank", "all collectives MB / rank", "largest unit sums MB",
                                    "Fisher shard MB / rank", "full Fisher MB"]), ""]
    write(args.name, {"fisher": fisher_rows, "step": step_rows, "fsdp": fsdp_rows, "options": opts,
                      "machine": machine()}, "\n".join(md), args.device)


if __name__ == "__main__":
    main()
