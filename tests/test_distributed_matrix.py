"""The engines' float64 matrix (``tests/test_engines.py: CASES``) across 2 gloo processes, against one process.

Each rank takes its half of every case's batch; the Fisher over both halves, and each sample's contribution
(``per_sample=True``, gathered in global order), must equal the loop over the whole batch in one process. Under DDP every case must; under FSDP2 (each block of the model's first ``ModuleList`` a
unit of its own, the root another) a case either equals one process or raises the ``GradselError`` that names
the candidates needing a fallback FSDP2 cannot run (module-local ``torch.func`` gradients, per-sample copies of
a parameter). One spawned pair runs all the cases of a test (about 15 s each on this project's 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import gradsel
from tests import test_engines as TE
from tests.dist_utils import gloo_rank, spawn_ranks

TIMEOUT = 900

# where fully_shard itself refuses these units (tied or shared weights across them): not gradsel's to run
FSDP_UNITS_REFUSED = {"bart_embedding_subclasses", "bart_equal_lengths", "module_shared_by_two_parents"}
# where FSDP2 runs and the Fisher must equal one process's (the rest raise the fallback's GradselError)
FSDP_EXACT = {
    "mlp", "cnn_batchnorm", "bert", "bert_lora", "smp_unet", "torchvision_resnet18_inplace", "gpt2_tied_lm_head",
    "gpt2_own_lm_loss", "depthwise_separable", "module_called_twice", "rms_norms", "torch_checkpoint",
    "conv_bn_tokens", "timm_norms", "smp_norms", "output_of_one_repeated_for_the_batch",
    "conv_over_each_samples_patches", "same_padding_convs", "transposed_convs", "batchnorm_over_tokens_in_dim_0",
    "bert_hf_gradient_checkpointing", "bert_question_answering", "video_3d_convs", "opt_learned_positions",
    "modernbert_local_attention", "mpt_alibi"}


def _size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return _size(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])


def _half(batch, n: int, rank: int):
    """This rank's samples: the first ``ceil(n / 2)`` on rank 0, the rest on rank 1."""
    cut = (n + 1) // 2
    part = slice(0, cut) if rank == 0 else slice(cut, n)
    if isinstance(batch, torch.Tensor):
        return batch[part] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _half(v, n, rank) for k, v in batch.items()}
    return type(batch)(_half(v, n, rank) for v in batch)


def _case(name: str):
    make, make_batch, *opts = TE.CASES[name]
    opts = dict(opts[0]) if opts else {}
    torch.manual_seed(0)
    return make().double(), TE._double(make_batch()), opts


def _wrap(model: nn.Module, how: str) -> nn.Module:
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1), [])
    for block in blocks:
        fully_shard(block)
    return fully_shard(model)


def _entry(rank: int, world: int, port: int, how: str, names: list, out: str) -> None:
    with gloo_rank(rank, world, port, Path(out) / f"{how}_{rank}.err", TIMEOUT):
        got = {}
        for name in names:
            model, batch, opts = _case(name)
            try:
                model = _wrap(model, how)
                f = gradsel.fisher(model, [_half(batch, _size(batch), rank)], loss=opts.get("loss"), progress=False,
                                   per_sample=True)
            except gradsel.GradselError as e:
                got[name] = str(e)
                continue
            # a shard's rows under FSDP2 (f.layouts: where they start), the whole tensor under DDP
            starts = {k: f.layouts[k].start for k in f} if hasattr(f, "layouts") else {k: 0 for k in f}
            got[name] = {k: (starts[k], t.clone()) for k, t in f.items()}
            got[name]["per sample"] = (0, f.per_sample.clone())  # every rank's, in global sample order
        torch.save(got, Path(out) / f"{how}_{rank}.pt")


def _run(how: str, names: list, tmp_path: Path) -> list:
    spawn_ranks(_entry, 2, how, names, str(tmp_path), out=tmp_path, timeout=TIMEOUT, errors=f"{how}_*.err")
    return [torch.load(tmp_path / f"{how}_{r}.pt", weights_only=False) for r in range(2)]


def _assert_one_process(name: str, runs: list, sharded: bool) -> None:
    model, batch, opts = _case(name)
    ref = gradsel.fisher_loop(model, batch, loss=opts.get("loss"), progress=False, per_sample=True)
    tol = opts.get("tol", 1e-10)
    largest = max(float(t.abs().max()) for t in ref.values())
    for run in runs:  # each sample's contribution (its sum of squares), the same on every rank
        torch.testing.assert_close(run[name]["per sample"][1], ref.per_sample, rtol=tol, atol=0, msg=name)
    for run in runs if not sharded else [None]:
        for k, full in ref.items():
            if sharded:  # the two ranks' rows, in order, are the whole tensor
                got = torch.cat([t for _, t in sorted((r[name][k] for r in runs), key=lambda p: p[0])])
            else:
                got = run[name][k][1]
            torch.testing.assert_close(got, full, rtol=tol, atol=tol * largest, msg=f"{name}: {k}")


def test_every_matrix_case_under_ddp_equals_one_process(tmp_path, one_thread):
    names = list(TE.CASES)
    runs = _run("ddp", names, tmp_path)
    for name in names:
        assert not isinstance(runs[0][name], str), f"{name}: {runs[0][name]}"
        _assert_one_process(name, runs, sharded=False)


def test_every_matrix_case_under_fsdp2_equals_one_process_or_says_why_not(tmp_path, one_thread):
    names = [n for n in TE.CASES if n not in FSDP_UNITS_REFUSED]
    runs = _run("fsdp", names, tmp_path)
    for name in names:
        if name in FSDP_EXACT:
            assert not isinstance(runs[0][name], str), f"{name}: {runs[0][name]}"
            _assert_one_process(name, runs, sharded=True)
        else:
            assert isinstance(runs[0][name], str), f"{name} ran under FSDP2: add it to FSDP_EXACT"
            assert "per-layer rules only" in runs[0][name] and runs[0][name] == runs[1][name]
