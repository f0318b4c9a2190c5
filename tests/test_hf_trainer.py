"""The HF Trainer with gradsel: sparse optimizer state equals the guarded dense AdamW, checkpoints resume."""

from __future__ import annotations

import copy

import pytest
import torch

import gradsel
from gradsel.masking import MaskHandle
from gradsel.optim import SparseAdamW
from tests import models as M

pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradsel.integrations.hf import STATE_NAME, GradselCallback, sparse_trainer_optimizer  # noqa: E402

STEPS = 20


def _rows():
    data = M.bert_batch(n=16, seed=3)
    return [{k: v[i] for k, v in data.items()} for i in range(16)]


def _selection(policy: str):
    model = M.bert()
    data = M.bert_batch(n=16, seed=3)
    if policy == "fish":
        return gradsel.select(model, data, "fish", keep=0.02, always=["classifier.*", "*.attention.output.LayerNorm.*"],
                              progress=False)
    # probe drift every 5 steps; groups below the mean drift twice in a row freeze (here at steps 10, 15 and 20).
    # Attention key biases get a zero gradient (softmax ignores them): their drift is rounding noise.
    return gradsel.select(model, data, "jsdrift", interval=5, rule="relative", lam=0.0, patience=2, blocks=2,
                          floor=0.3, probe_samples=8, exclude="*.key.bias", progress=False)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=0.01, warmup_steps=3, seed=7, data_seed=7, use_cpu=True,
                report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _train(selection, out, *, sparse: bool, stop_at=None, resume=None, extra=(), **callback_options):
    """One Trainer run on a fresh BERT; returns (model, trainer, callback)."""
    model = M.bert()
    args = _args(out, save_strategy="steps" if stop_at else "no", save_steps=stop_at or 500)
    callback = GradselCallback(selection, **callback_options)
    optimizers = (sparse_trainer_optimizer(selection, model, args), None) if sparse else (None, None)
    callbacks = [callback, *extra] + ([_StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(model=model, args=args, train_dataset=_rows(), optimizers=optimizers, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback


@pytest.mark.parametrize("policy", ["fish", "jsdrift"])
def test_sparse_adamw_equals_the_guarded_trainer_adamw_with_clipping_and_decay(tmp_path, policy):
    sel = _selection(policy)
    start = {n: p.detach().clone() for n, p in M.bert().named_parameters()}
    dense_sel, sparse_sel = copy.deepcopy(sel), copy.deepcopy(sel)
    dense, dense_trainer, _ = _train(dense_sel, tmp_path / "dense", sparse=False)
    sparse, trainer, _ = _train(sparse_sel, tmp_path / "sparse", sparse=True)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, SparseAdamW)
    # clipping binds (the pre-clip norm over the selected entries is above max_grad_norm) on every step
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == STEPS and min(norms) > 0.01
    assert norms == pytest.approx([h["grad_norm"] for h in dense_trainer.state.log_history if "grad_norm" in h],
                                  rel=1e-4)
    # the Trainer's scheduler drove the sparse optimizer: linear decay to 0 at max_steps
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in opt.param_groups)
    # the Trainer's no-decay rule: biases and LayerNorm weights train without weight decay
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for n, p in sparse.named_parameters():
        if id(p) in no_decay | decayed:
            assert (id(p) in no_decay) == ("bias" in n or "LayerNorm" in n), n
    assert any("LayerNorm.weight" in n for n, p in sparse.named_parameters() if id(p) in no_decay) or policy != "fish"
    if policy == "jsdrift":  # the policy froze groups (whole tensors and row blocks) during training
        assert set(sparse_sel.info["jsdrift"]["frozen"].values()) == {10, 15, 20}
        assert all(torch.equal(sparse_sel.masks[n], dense_sel.masks[n]) for n in sel.masks)
        assert any(bool(m.any()) and not bool(m.all()) for m in sparse_sel.masks.values())
    worst = 0.0
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        worst = max(worst, float((p.detach() - q.detach()).abs().max()))
        if n in sel.masks:  # nothing outside the starting selection moved
            assert torch.equal(p.detach()[~sel.masks[n]], start[n][~sel.masks[n]]), n
    assert worst <= 1e-6
    moved = sum(int((p.detach() != start[n]).sum()) for n, p in sparse.named_parameters())
    assert moved > 0.5 * sparse_sel.selected()


@pytest.mark.parametrize("policy,sparse", [("fish", True), ("jsdrift", True), ("jsdrift", False)])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(tmp_path, policy, sparse):
    sel = _selection(policy)
    whole, _, _ = _train(copy.deepcopy(sel), tmp_path / "whole", sparse=sparse)
    _train(copy.deepcopy(sel), tmp_path / "cut", sparse=sparse, stop_at=10)
    ckpt = tmp_path / "cut" / "checkpoint-10"
    assert (ckpt / STATE_NAME).is_file()
    resumed_sel = copy.deepcopy(sel)
    resumed, trainer, _ = _train(resumed_sel, tmp_path / "cut", sparse=sparse, resume=str(ckpt))
    assert trainer.state.global_step == STEPS
    for (n, p), q in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    if policy == "jsdrift":
        assert set(resumed_sel.info["jsdrift"]["frozen"].values()) == {10, 15, 20}  # 15, 20: after the resume


def test_a_progressive_resume_without_its_state_is_refused(tmp_path):
    sel = _selection("jsdrift")
    _train(copy.deepcopy(sel), tmp_path / "cut", sparse=False, stop_at=10)
    (tmp_path / "cut" / "checkpoint-10" / STATE_NAME).unlink()
    with pytest.raises(gradsel.GradselError, match="cannot be restored"):
        _train(copy.deepcopy(sel), tmp_path / "other", sparse=False, resume=str(tmp_path / "cut" / "checkpoint-10"))


def test_training_stops_when_the_handle_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(MaskHandle, "done", property(lambda self: self.steps >= 3), raising=False)
    _, trainer, _ = _train(_selection("fish"), tmp_path, sparse=True)
    assert trainer.state.global_step == 3
    _, trainer, _ = _train(_selection("fish"), tmp_path / "all", sparse=True, stop_when_done=False)
    assert trainer.state.global_step == STEPS > 3  # the steps the arguments asked for


def test_set_mask_shrinks_the_state_like_a_guarded_dense_adamw():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    ref = torch.nn.Parameter(w.detach().clone())
    first = torch.rand(6, 5) < 0.7
    opt = SparseAdamW([(w, first)], lr=0.05, weight_decay=0.1)
    dense = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1, foreach=False)
    mask = first
    for step in range(8):
        if step == 4:
            mask = first & (torch.rand(6, 5) < 0.5)
            opt.set_mask(w, mask)
        g = torch.randn(6, 5)
        w.grad, ref.grad = g.clone(), g * mask
        before = ref.detach().clone()
        opt.step()
        dense.step()
        with torch.no_grad():
            ref[~mask] = before[~mask]
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=1e-6)
    assert opt.state[w]["exp_avg"].numel() == int(mask.sum())
    with pytest.raises(gradsel.GradselError, match="can only shrink"):
        opt.set_mask(w, first)
