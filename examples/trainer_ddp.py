"""FISH Mask selection and sparse fine-tuning of a BERT with the HF Trainer under its own DDP setup.

    torchrun --nproc-per-node 2 examples/trainer_ddp.py                 # CPU: gloo (use_cpu=True)
    torchrun --nproc-per-node 2 examples/trainer_ddp.py --out sel.safetensors

``TrainingArguments`` sets up the process group from torchrun's environment (gloo on the CPU, NCCL on
GPUs). gradsel selects under that group before the Trainer is built: each rank estimates the Fisher on
its own part of the data (a DistributedSampler), the sums are added, every rank gets the same masks
(checked). ``sparse_trainer_optimizer`` freezes the tensors with nothing selected before the Trainer wraps
the model in DDP, so they never enter DDP's buckets (hence ``ddp_find_unused_parameters=False``), and
``GradselCallback`` keeps the Trainer's clipping on the selected entries. The model is a small BERT built
from a config (no download); the data are random tokens with a learnable label.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import gradsel
from gradsel.integrations.hf import GradselCallback, sparse_trainer_optimizer


ALWAYS = "classifier.*"  # the freshly initialised head: trained in full, outside the ranking


def make_rows(n: int = 64, t: int = 12, vocab: int = 200) -> list[dict]:
    """The same rows on every rank; the label says whether token 7 occurs (padding varies)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = (ids == 7).any(1).long() | (ids[:, 0] % 2)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def make_model() -> BertForSequenceClassification:
    """A 2-layer BERT from a config, the same on every rank."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, attn_implementation="eager")
    return BertForSequenceClassification(config)


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="trainer_ddp_out", help="the Trainer's output_dir")
    parser.add_argument("--out", default=None, help="save the selection here (rank 0 writes it)")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--keep", type=float, default=0.02, help="share of the candidate elements to train")
    parser.add_argument("--optimizer", choices=["sparse", "dense"], default="sparse",
                        help="sparse: SparseAdamW (state for the selection only); dense: the Trainer's AdamW, guarded")
    parser.add_argument("--check-dir", default=None,
                        help="each rank writes its masks and initial/final parameters here (used by the tests)")
    opts = parser.parse_args()

    cpu = not torch.cuda.is_available()
    args = TrainingArguments(output_dir=opts.output_dir, use_cpu=cpu, ddp_backend="gloo" if cpu else "nccl",
                             # sparse: frozen tensors never enter DDP; dense: the callback freezes them after
                             # the Trainer wrapped the model, so DDP must look for unused parameters
                             ddp_find_unused_parameters=opts.optimizer == "dense", max_steps=opts.steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, weight_decay=0.01, max_grad_norm=1.0, seed=0, report_to=[],
                             save_strategy="no", logging_steps=5, disable_tqdm=True, dataloader_num_workers=0)
    # building TrainingArguments initialised the process group (torchrun's env): select under it
    rank, world = args.process_index, args.world_size
    if world != int(os.environ.get("WORLD_SIZE", 1)):
        raise SystemExit(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the Trainer sees {world} process(es)")

    model = make_model().to(args.device)
    rows = make_rows()
    device = args.device
    loader = DataLoader(rows, batch_size=8, sampler=DistributedSampler(rows, world, rank, shuffle=False),
                        collate_fn=lambda b: {k: v.to(device) for k, v in collate(b).items()})
    selection = gradsel.select(model, loader, "fish", keep=opts.keep, always=ALWAYS,
                               progress=False)  # the Fisher over all ranks' rows; masks checked to agree
    start = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    optimizers = (None, None)
    if opts.optimizer == "sparse":  # before the Trainer wraps the model in DDP
        optimizers = (sparse_trainer_optimizer(selection, model, args), None)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      optimizers=optimizers, callbacks=[GradselCallback(selection)])
    trainer.train()
    try:  # how many tensors the Trainer's DDP registered (a prototype torch interface: None if it changes)
        ddp_tensors = trainer.model_wrapped._get_ddp_logging_data().get("num_parameter_tensors")
    except Exception:
        ddp_tensors = None

    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    frozen = list(optimizers[0].frozen) if optimizers[0] is not None else []
    moved = [n for n, m in selection.masks.items() if not torch.equal(params[n][~m], start[n][~m])]
    if moved:
        raise SystemExit(f"rank {rank}: masked entries moved in {moved}")
    flat = torch.cat([p.reshape(-1) for p in params.values()]).to(device)
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    if not all(torch.equal(e, flat) for e in everyone):
        raise SystemExit(f"rank {rank}: the replicas differ after training")
    if opts.check_dir:
        torch.save({"world": world, "masks": selection.masks, "start": start, "end": params,
                    "frozen": frozen, "ddp_tensors": ddp_tensors, "global_step": trainer.state.global_step},
                   os.path.join(opts.check_dir, f"rank{rank}.pt"))
    if trainer.is_world_process_zero():
        print(f"{world} process(es), {trainer.state.global_step} Trainer steps; {selection.selected()} of "
              f"{selection.total()} candidate elements trained ({opts.optimizer} optimizer; "
              f"{len(frozen)} tensors frozen before DDP); masks agree; masked entries fixed; replicas identical")
        if opts.out:
            selection.save(opts.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
