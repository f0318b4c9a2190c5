"""Fisher, selection and masked training across processes with HF accelerate.

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_select_train.py       # CPU: 2 gloo ranks
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_select_train.py --mode apply --out sel.safetensors

Every rank estimates the Fisher on its own part of the data (a DistributedSampler built from the
accelerator's rank and world size), gradsel adds the ranks' sums, every rank selects the same masks
(checked by hash), then ``accelerator.prepare(model, optimizer, loader)`` wraps the model in DDP and the
selection is trained (``--mode sparse``: SparseAdamW, state for the selected elements only; ``--mode apply``:
``Selection.apply`` guarding torch's AdamW). At the end the script checks that no masked entry moved and
that the replicas are identical, and rank 0 saves the selection. On GPUs the same script runs on NCCL.

On a CPU machine, ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate 1.15 leaves
multi-CPU runs to ``mpirun --mpirun_hostfile``); ``--multi_gpu --num_processes 2`` starts two through
torchrun, and ``Accelerator(cpu=True)`` (this script, when no GPU is seen) makes them one gloo group.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsel


ALWAYS = "4.*"  # the freshly initialised head: trained in full, outside the ranking


def make_data(n: int = 203) -> TensorDataset:
    """The same data on every rank: a random teacher's labels (203 rows: not a multiple of the world size)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def make_model() -> nn.Module:
    """The same initial model on every rank (DDP also broadcasts rank 0's at prepare)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["sparse", "apply"], default="sparse",
                        help="sparse: SparseAdamW over the selection; apply: Selection.apply with torch AdamW")
    parser.add_argument("--out", default=None, help="save the selection here (rank 0 writes it)")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--keep", type=float, default=0.05, help="share of the elements to train")
    parser.add_argument("--check-dir", default=None,
                        help="each rank writes its masks and initial/final parameters here (used by the tests)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        print("warning: one process only. `accelerate launch --cpu --num_processes N` does not start N processes "
              "(accelerate leaves multi-CPU to mpirun); use `accelerate launch --multi_gpu --num_processes N`",
              file=sys.stderr)
    if world != int(os.environ.get("WORLD_SIZE", world)):  # e.g. Accelerator() without cpu=True on a CPU machine
        raise SystemExit(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the accelerator sees {world} process(es)")

    model = make_model().to(accelerator.device)
    data = make_data()

    # 1. Fisher and selection across processes, before prepare. gradsel numbers a DistributedSampler's samples
    # by dataset index and skips its padding; a prepared loader pads with repeated samples (even_batches).
    device = accelerator.device
    fisher_loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, world, rank, shuffle=False),
                               collate_fn=lambda rows: tuple(torch.stack(c).to(device) for c in zip(*rows)))
    fisher = gradsel.fisher(model, fisher_loader, progress=False)  # every rank: the sums over all ranks
    selection = gradsel.select(model, None, "fish", keep=args.keep, always=ALWAYS, fisher=fisher,
                               progress=False)  # masks checked to agree across ranks
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    # 2. the optimizer (or the guard) before prepare: tensors it freezes whole stay out of DDP's buckets
    handle = None
    if args.mode == "sparse":
        optimizer = selection.optimizer(model, lr=1e-2, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        handle = selection.apply(model, optimizer)
    train_loader = DataLoader(data, batch_size=16, shuffle=True)
    ddp, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    prepared_error = None
    if args.check_dir and world > 1:  # gradsel refuses the prepared loader (it would count repeated samples)
        try:
            gradsel.fisher(model, train_loader, progress=False)
        except gradsel.GradselError as exc:
            prepared_error = str(exc)

    # 3. masked training through the DDP wrapper
    step = 0
    while step < args.steps:
        for x, y in train_loader:
            optimizer.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(ddp(x), y))
            optimizer.step()
            if handle is not None:
                handle.step()
            step += 1
            if step == args.steps:
                break

    # 4. checks: masked entries fixed on this rank, replicas identical across ranks
    params = dict(model.named_parameters())
    moved = [n for n, m in selection.masks.items() if not torch.equal(params[n][~m], start[n][~m])]
    if moved:
        raise SystemExit(f"rank {rank}: masked entries moved in {moved}")
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    everyone = accelerator.gather(flat[None])  # (world, numel)
    if not bool((everyone == everyone[0]).all()):
        raise SystemExit(f"rank {rank}: the replicas differ after {args.steps} steps")
    if args.check_dir:
        torch.save({"world": world, "masks": selection.masks, "start": start, "num_samples": fisher.num_samples,
                    "prepared_error": prepared_error,
                    "end": {n: p.detach().cpu().clone() for n, p in params.items()}},
                   os.path.join(args.check_dir, f"rank{rank}.pt"))
    if accelerator.is_main_process:
        print(f"fisher over {fisher.num_samples} samples on {world} process(es); masks agree; "
              f"{selection.selected()} of {selection.total()} candidate elements trained for {args.steps} steps "
              f"({args.mode}); masked entries fixed; replicas identical")
        if args.out:
            selection.save(args.out)
    accelerator.wait_for_everyone()
    if handle is not None:
        handle.remove()
    accelerator.end_training()


if __name__ == "__main__":
    main()
