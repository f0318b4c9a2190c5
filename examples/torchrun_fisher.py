"""Fisher, selection and masked DDP training across processes, launched by torchrun.

    torchrun --nproc-per-node 2 examples/torchrun_fisher.py            # CPU: gloo
    torchrun --nproc-per-node 2 examples/torchrun_fisher.py --out sel.safetensors

Every rank estimates the Fisher on its own part of the data (a DistributedSampler), gradsel adds the
ranks' sums, every rank selects the same masks (checked), and DDP trains only the selection with
SparseAdamW. On GPUs the same script runs on NCCL (one GPU per rank).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradsel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="save the selection here (rank 0 writes it)")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--keep", type=float, default=0.05, help="share of the elements to train")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        torch.manual_seed(0)  # the same data and the same initial model on every rank
        data = TensorDataset(torch.randn(203, 16), torch.randint(0, 4, (203,)))  # 203: not a multiple of world
        model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
        sampler = DistributedSampler(data, shuffle=False)
        loader = DataLoader(data, batch_size=32, sampler=sampler,
                            collate_fn=lambda rows: tuple(torch.stack(c).to(device) for c in zip(*rows)))

        fisher = gradsel.fisher(model, loader, progress=False)  # the sums of all ranks, every rank
        selection = gradsel.select(model, loader, "fish", keep=args.keep, always="2.*", fisher=fisher,
                                   progress=False)  # masks checked to agree across ranks
        optimizer = selection.optimizer(model, lr=1e-2)  # before wrapping: frozen tensors leave DDP's buckets
        ddp = nn.parallel.DistributedDataParallel(model)
        for step in range(args.steps):
            sampler.set_epoch(step)
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(ddp(x), y).backward()
                optimizer.step()
                break  # one batch per step is enough for the example
        if rank == 0:
            print(f"fisher over {fisher.num_samples} samples on {world} ranks; masks agree on {world} ranks; "
                  f"{selection.selected()} of {selection.total()} candidate elements trained")
            if args.out:
                selection.save(args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
