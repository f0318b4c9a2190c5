"""The launcher examples run for real: 2 processes on gloo at 127.0.0.1, each run bounded in time.

Each example writes every rank's masks and initial/final parameters to tmp_path; the parent checks that the
ranks agree bit for bit, that no masked entry moved, that the selection trained, and that the masks are a
top-k of the Fisher that one process computes over all the data.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import gradsel
from tests.dist_utils import ROOT, free_port, launcher_env, run_launcher, torchrun

TIMEOUT = 120  # seconds per launch (each takes 10-20 s on 2 cores, 25-50 s when ~8 jobs share them)
EXAMPLES = ROOT / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(cmd: list[str], env: dict | None = None) -> str:
    proc = run_launcher(cmd, TIMEOUT, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _runs(check: Path, world: int = 2) -> list[dict]:
    files = sorted(check.glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(world)]
    return [torch.load(f, weights_only=False) for f in files]


def _assert_trained_alike(runs: list[dict], model: torch.nn.Module) -> dict:
    """Ranks agree; masked entries fixed; the selection moved; the start is the example's initial model."""
    r0 = runs[0]
    assert all(r["world"] == len(runs) for r in runs)
    initial = {n: p.detach() for n, p in model.named_parameters()}
    for r in runs:
        assert sorted(r["masks"]) == sorted(r0["masks"])
        for n, m in r0["masks"].items():
            assert torch.equal(r["masks"][n], m), n  # identical masks
        for n in r0["end"]:
            assert torch.equal(r["start"][n], initial[n]), n
            assert torch.equal(r["end"][n], r0["end"][n]), n  # identical final parameters, bit for bit
    moved = 0
    for n, m in r0["masks"].items():
        assert torch.equal(r0["end"][n][~m], r0["start"][n][~m]), n  # masked entries never moved
        moved += int((r0["end"][n][m] != r0["start"][n][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in r0["masks"].values())  # the selection trained
    return r0["masks"]


def _assert_top_k(masks: dict, fisher: gradsel.Fisher, always: list[str], budget: int) -> None:
    """The masks are the top ``budget`` of one process's Fisher over all the data (float32 sums in another
    order: ties within rounding may fall either way)."""
    cand = [n for n in masks if n not in always]
    assert all(bool(masks[n].all()) for n in always)
    chosen = torch.cat([fisher[n][masks[n]].reshape(-1) for n in cand])
    left = torch.cat([fisher[n][~masks[n]].reshape(-1) for n in cand])
    assert len(chosen) == budget
    assert float(chosen.min()) >= float(left.max()) * (1 - 1e-4)


def _accelerate(script: Path, *args: str, tmp: Path) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(script), *args]
    return cmd, launcher_env(HF_HOME=str(tmp / "hf"))  # no user accelerate config file changes the launch


@pytest.mark.parametrize("mode", ["sparse", "apply"])
def test_accelerate_example_two_processes(tmp_path, mode, one_thread):
    pytest.importorskip("accelerate")
    check, out = tmp_path / "check", tmp_path / "sel.safetensors"
    check.mkdir()
    cmd, env = _accelerate(EXAMPLES / "accelerate_select_train.py", "--mode", mode, "--steps", "8",
                           "--out", str(out), "--check-dir", str(check), tmp=tmp_path)
    stdout = _launch(cmd, env)
    assert "on 2 process(es)" in stdout
    ex = _example("accelerate_select_train")
    runs = _runs(check)
    masks = _assert_trained_alike(runs, ex.make_model())
    # the Fisher counted each of the 203 samples once (the DistributedSampler's padding duplicate dropped)
    assert all(r["num_samples"] == 203 for r in runs)
    # the loader accelerate prepared (its padding would repeat samples) is refused with a way out
    for r in runs:
        assert "accelerator.prepare" in r["prepared_error"] and "DistributedSampler" in r["prepared_error"]
    model = ex.make_model()
    fisher = gradsel.fisher(model, DataLoader(ex.make_data(), batch_size=32), progress=False)
    saved = gradsel.Selection.load(out)
    _assert_top_k(masks, fisher, ["4.weight", "4.bias"], saved.budget)
    assert all(torch.equal(saved.masks[n], m) for n, m in masks.items())  # rank 0 saved the complete masks


def test_accelerate_cpu_flag_starts_one_process(tmp_path, one_thread):
    """``accelerate launch --cpu --num_processes 2`` starts one process (accelerate leaves multi-CPU to mpirun):
    the example says so instead of looking like a 2-process run."""
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(EXAMPLES / "accelerate_select_train.py"), "--steps", "2"]
    proc = run_launcher(cmd, TIMEOUT, launcher_env(HF_HOME=str(tmp_path / "hf")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 1 process(es)" in proc.stdout
    assert "one process only" in proc.stderr and "--multi_gpu" in proc.stderr


@pytest.mark.parametrize("optimizer", ["sparse", "dense"])
def test_trainer_ddp_example_two_processes(tmp_path, optimizer, one_thread):
    pytest.importorskip("transformers")
    check, out = tmp_path / "check", tmp_path / "sel.safetensors"
    check.mkdir()
    stdout = _launch(torchrun(EXAMPLES / "trainer_ddp.py", "--steps", "6", "--output-dir", str(tmp_path / "trainer"),
                              "--optimizer", optimizer, "--out", str(out), "--check-dir", str(check)))
    assert "2 process(es), 6 Trainer steps" in stdout
    ex = _example("trainer_ddp")
    runs = _runs(check)
    masks = _assert_trained_alike(runs, ex.make_model())
    assert all(r["global_step"] == 6 for r in runs)
    unselected = {n for n, m in masks.items() if not bool(m.any())}
    assert unselected  # the case that needs care under DDP: tensors frozen whole
    if optimizer == "sparse":  # frozen before the Trainer's DDP was built: they are not in its buckets
        assert set(runs[0]["frozen"]) == unselected
        if runs[0]["ddp_tensors"] is not None:
            assert runs[0]["ddp_tensors"] == len(masks) - len(unselected)
    elif runs[0]["ddp_tensors"] is not None:  # dense: DDP registered them all and found them unused
        assert runs[0]["ddp_tensors"] == len(masks)
    saved = gradsel.Selection.load(out)
    rows = ex.make_rows()
    fisher = gradsel.fisher(ex.make_model(), DataLoader(rows, batch_size=8, collate_fn=ex.collate), progress=False)
    assert fisher.num_samples == 64
    _assert_top_k(masks, fisher, saved.always, saved.budget)
    assert all(torch.equal(saved.masks[n], m) for n, m in masks.items())


# -- the Trainer callback's guard against freezing under DDP without find_unused_parameters ------------------------

def _trainer_args(world: int, find, **extra):
    """What the guard reads of ``TrainingArguments``: a real one cannot report world_size > 1 without a process
    group, so the fields are stood in (names as in transformers 5)."""
    from types import SimpleNamespace

    return SimpleNamespace(world_size=world, ddp_find_unused_parameters=find, activation_checkpointing=False,
                           fsdp="", deepspeed=None, output_dir="unused", resume_from_checkpoint=None, **extra)


def _begin(sel, model, args, optimizer):
    from types import SimpleNamespace

    from gradsel.integrations.hf import GradselCallback

    cb = GradselCallback(sel)
    cb.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model, optimizer=optimizer)
    return cb


def test_trainer_callback_refuses_freezing_under_ddp_without_find_unused(one_thread):
    """world_size > 1 and find_unused_parameters False (given, or the Trainer's default for a PreTrainedModel
    without checkpointing is True, with checkpointing False): a selection that freezes whole tensors after the
    Trainer wrapped the model raises before training, naming the fixes; every other case applies."""
    pytest.importorskip("transformers")
    from tests import models as M

    from gradsel.integrations.hf import sparse_trainer_optimizer

    batch = M.mlp_batch(n=12)
    model = M.mlp()
    sel = gradsel.select(model, batch, "fish", keep=3, progress=False)
    frozen = [n for n, m in sel.masks.items() if not bool(m.any())]
    assert frozen  # the case that needs care
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(gradsel.GradselError, match=r"2 processes under DDP with find_unused_parameters=False") as err:
        _begin(sel, model, _trainer_args(2, False), opt)
    assert repr(frozen[0]) in str(err.value) and "sparse_trainer_optimizer" in str(err.value)
    assert "ddp_find_unused_parameters=True" in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # raised before applying anything
    for world, find in ((2, True), (2, None), (1, False)):  # find_unused on, the default for a plain module, 1 rank
        cb = _begin(sel, model, _trainer_args(world, find), opt)
        assert cb.handle is not None and not dict(model.named_parameters())[frozen[0]].requires_grad
        cb.on_train_end(None, None, None)
    # nothing frozen whole: nothing to wait for
    everything = gradsel.select(model, batch, "fish", keep=1.0, progress=False)
    _begin(everything, model, _trainer_args(2, False), opt).on_train_end(None, None, None)
    # sparse mode: the tensors were frozen before the Trainer wrapped the model
    sparse = sparse_trainer_optimizer(sel, model, SimpleArgs())
    _begin(sel, model, _trainer_args(2, False), sparse).on_train_end(None, None, None)
    # a progressive policy freezes during training, in either mode: only find_unused_parameters helps
    drift = gradsel.select(M.mlp(), [batch], "jsdrift", progress=False)
    fresh = M.mlp()
    with pytest.raises(gradsel.GradselError, match="sparse mode does not avoid this") as err:
        _begin(drift, fresh, _trainer_args(2, False), sparse_trainer_optimizer(drift, fresh, SimpleArgs()))
    assert "ddp_find_unused_parameters=True" in str(err.value) and "'jsdrift'" in str(err.value)
    # a PreTrainedModel: the Trainer's default is find_unused = not checkpointing
    bert = M.bert()
    bsel = gradsel.select(bert, M.bert_batch(n=8), "fish", keep=20, progress=False)
    bopt = torch.optim.AdamW(bert.parameters(), lr=0.1)
    _begin(bsel, bert, _trainer_args(2, None), bopt).on_train_end(None, None, None)
    bert.activation_checkpointing_enable()
    with pytest.raises(gradsel.GradselError, match="find_unused_parameters=False"):
        _begin(bsel, bert, _trainer_args(2, None), bopt)


class SimpleArgs:
    """The AdamW fields of ``TrainingArguments`` that sparse_trainer_optimizer reads."""

    learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 0.1, 0.9, 0.999, 1e-8, 0.0
