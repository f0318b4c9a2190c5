"""Masks must hold: masked entries never move, under any optimizer; selected ones still can."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError

from . import models as M

OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _train(model, opt, steps, handle=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if handle is not None:
            handle.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_entries_are_bit_for_bit_unchanged(name):
    model = M.mlp()
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, 5)  # the optimizer now carries momentum / moments for every entry
    sel = gradsel.select(model, M.mlp_batch(n=32), "fish", keep=0.2, progress=False)
    sel.masks["3.bias"][:] = False  # a whole tensor masked as well
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    keys, classes = list(model.state_dict()), [type(m) for m in model.modules()]
    with sel.apply(model, opt) as handle:
        assert not model[3].bias.requires_grad
        _train(model, opt, 40, handle, seed=1)
        assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == classes
    for n, p in model.named_parameters():
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{name}: masked entries of {n} moved"
        assert bool((p.detach()[m] != before[n][m]).all()), f"{name}: a selected entry of {n} did not move"
    # remove() restores plain training
    assert model[3].bias.requires_grad
    _train(model, opt, 3, seed=2)
    assert not torch.equal(model[0].weight.detach()[~sel.masks["0.weight"]], before["0.weight"][~sel.masks["0.weight"]])


def test_gradient_hooks_zero_masked_gradients_for_clipping():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "random", keep=0.3, progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sel.apply(model, opt):
        x, y = M.mlp_batch(seed=5)
        nn.functional.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            assert bool((p.grad[~sel.masks[n]] == 0).all()), n
            assert bool((p.grad[sel.masks[n]] != 0).any()), n


def test_an_infinite_gradient_in_a_masked_entry_does_not_reach_the_optimizer():
    model = nn.Linear(3, 1, bias=False)
    sel = gradsel.select(model, None, "random", keep=1, progress=False)
    kept = sel.masks["weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    with sel.apply(model, opt):
        scale = torch.where(kept, torch.ones(1, 3), torch.full((1, 3), float("inf")))
        (model.weight * scale).sum().backward()  # masked entries get an infinite gradient
        assert torch.equal(model.weight.grad[~kept], torch.zeros(2))
        assert bool(torch.isfinite(model.weight.grad).all())
        opt.step()
    assert torch.equal(model.weight.detach()[~kept], before[~kept])
    assert torch.equal(model.weight.detach()[kept], before[kept] - 0.1)


def test_without_optimizer_it_warns_that_decay_can_move_entries():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "random", keep=0.3, progress=False)
    with pytest.warns(UserWarning, match="Pass the optimizer"):
        handle = sel.apply(model)
    # the gradients are still masked without an optimizer
    x, y = M.mlp_batch(seed=3)
    nn.functional.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        if p.grad is None:  # nothing selected: not even computed
            assert not bool(sel.masks[n].any()) and not p.requires_grad, n
        else:
            assert bool((p.grad[~sel.masks[n]] == 0).all()), n
    handle.remove()


def test_apply_to_a_different_model_fails_with_the_first_mismatch():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "random", keep=0.3, progress=False)
    other = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Dropout(0.3), nn.Linear(17, 3))
    with pytest.raises(GradselError, match=r"'0.weight' has shape \(17, 6\) in the model but \(16, 6\)"):
        sel.apply(other)
    with pytest.raises(GradselError, match="does not have"):
        sel.apply(M.cnn())


def test_load_against_a_different_model_and_a_truncated_file(tmp_path):
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "fish", keep=0.3, progress=False)
    path = sel.save(tmp_path / "sel.safetensors")
    with pytest.raises(GradselError, match="'0.weight' has shape"):
        gradsel.Selection.load(path, nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(), nn.Linear(8, 3)))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GradselError, match="truncated or corrupted"):
        gradsel.Selection.load(tmp_path / "cut.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # atomic save leaves no temp file behind


def test_hf_trainer_callback_keeps_masked_weights(tmp_path):
    from transformers import Trainer, TrainingArguments

    from gradsel.integrations.hf import GradselCallback

    model = M.bert()
    data = M.bert_batch(n=16)
    rows = [{k: v[i] for k, v in data.items()} for i in range(16)]
    sel = gradsel.select(model, data, "fish", keep=0.01, always="classifier.*", progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, report_to="none", use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    callback = GradselCallback(sel)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    moved = 0
    for n, p in model.named_parameters():
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        moved += int((p.detach()[m] != before[n][m]).sum())
    assert moved > 0.9 * sel.trainable()
    assert callback.handle is None and all(p.requires_grad for p in model.parameters())
