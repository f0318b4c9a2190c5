"""Masks must hold: masked entries never move, under any optimizer; selected ones still can."""

from __future__ import annotations

import copy

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


# -- resume from a checkpoint: no value is held between steps -------------------------------------------------
class _AdamWSubclass(torch.optim.AdamW):
    """An optimizer the guard does not know: it falls back to a transient copy per step."""


RESUME_OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "unknown_subclass": lambda p: _AdamWSubclass(p, lr=0.01, weight_decay=0.1),
}


def _resume_selection(keep):
    sel = gradsel.select(M.mlp(), None, "random", keep=keep, seed=3, progress=False)
    sel.masks["3.bias"][:] = False  # one tensor frozen whole
    return sel


def _continue(model, opt, handle):
    torch.manual_seed(7)  # dropout draws the same masks in every run
    _train(model, opt, 5, handle, seed=2)


@pytest.mark.parametrize("keep", [0.02, 0.3], ids=["index", "bits"])
@pytest.mark.parametrize("order", ["apply_then_load", "load_then_apply"])
@pytest.mark.parametrize("name", list(RESUME_OPTIMIZERS))
def test_resume_from_a_checkpoint_is_bit_identical_in_either_order(name, order, keep):
    make, sel = RESUME_OPTIMIZERS[name], _resume_selection(keep)
    model = M.mlp()
    opt = make(model.parameters())
    _train(model, opt, 3, seed=0)  # optimizer state for every entry before the selection
    handle = sel.apply(model, opt)
    form = handle.guards["0.weight"].entries
    assert (form.index is not None) == (keep < 1 / 32), "the test covers both compact forms"
    torch.manual_seed(5)
    _train(model, opt, 4, handle, seed=1)
    checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _continue(model, opt, handle)
    handle.remove()

    fresh = M.mlp(seed=11)  # other initial values, which a stale copy would write back
    fresh_opt = make(fresh.parameters())
    if order == "apply_then_load":
        fresh_handle = sel.apply(fresh, fresh_opt)
        fresh.load_state_dict(checkpoint[0])
        fresh_opt.load_state_dict(checkpoint[1])
    else:
        fresh.load_state_dict(checkpoint[0])
        fresh_opt.load_state_dict(checkpoint[1])
        fresh_handle = sel.apply(fresh, fresh_opt)
    _continue(fresh, fresh_opt, fresh_handle)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, model.state_dict()[n]), f"{name}/{order}: {n} left the uninterrupted trajectory"
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], checkpoint[0][n][~m]), f"{name}/{order}: masked entries of {n} moved"
        assert not torch.equal(p.detach()[m], checkpoint[0][n][m]) or not m.any(), n


SINGLE_STEP = {
    "sgd_wd": dict(cls=torch.optim.SGD, lr=0.05, weight_decay=0.01),
    "sgd_nesterov_maximize": dict(cls=torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                  maximize=True),
    "sgd_foreach": dict(cls=torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=True),
    "adam_amsgrad_maximize": dict(cls=torch.optim.Adam, lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True),
    "adam_foreach": dict(cls=torch.optim.Adam, lr=0.01, weight_decay=0.05, foreach=True),
    "adamw": dict(cls=torch.optim.AdamW, lr=0.01, weight_decay=0.1),
    "adamw_foreach_amsgrad": dict(cls=torch.optim.AdamW, lr=0.01, weight_decay=0.1, foreach=True, amsgrad=True),
    "adamw_tensor_lr": dict(cls=torch.optim.AdamW, lr=torch.tensor(0.01), weight_decay=0.1),
    "adam_decoupled": dict(cls=torch.optim.Adam, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("name", list(SINGLE_STEP))
def test_selected_entries_step_exactly_as_the_plain_optimizer(name):
    """From the same weights, state and (masked) gradients, the guarded step gives the selected entries bit for
    bit what the unguarded optimizer computes, and leaves the masked ones where they were."""
    options = dict(SINGLE_STEP[name])
    cls = options.pop("cls")
    sel = gradsel.select(M.mlp(), None, "random", keep=0.3, seed=4, progress=False)
    model, plain = M.mlp(), M.mlp()
    opt = cls(model.parameters(), **options)
    handle = sel.apply(model, opt)
    _train(model, opt, 3, handle, seed=1)
    plain.load_state_dict(model.state_dict())
    plain_opt = cls(plain.parameters(), **options)
    plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = M.mlp_batch(seed=9)
    for net, o in ((model, opt), (plain, plain_opt)):
        o.zero_grad()
        torch.manual_seed(3)
        nn.functional.cross_entropy(net(x), y).backward()
    for n, p in plain.named_parameters():
        p.grad.masked_fill_(~sel.masks[n], 0)
    opt.step()
    plain_opt.step()
    assert opt.param_groups[0]["weight_decay"] == options["weight_decay"]  # given back after the step
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        m = sel.masks[n]
        assert torch.equal(p.detach()[m], q.detach()[m]), f"{name}: selected entries of {n} differ"
        assert torch.equal(p.detach()[~m], before[n][~m]), f"{name}: masked entries of {n} moved"
        if m.any():
            assert torch.equal(p.grad, q.grad), f"{name}: the gradient of {n} was not given back"


def test_a_step_with_a_closure_and_a_step_that_raises_keep_masked_entries_and_settings():
    model = M.mlp()
    sel = gradsel.select(model, None, "random", keep=0.2, seed=1, progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    _train(model, opt, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = sel.apply(model, opt)
    x, y = M.mlp_batch(seed=2)

    def closure():  # the gradients appear inside step, after the pre-hook ran
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad(set_to_none=True)
    for _ in range(3):
        opt.step(closure)
    opt.param_groups[0]["betas"] = None  # makes the next step raise inside the optimizer
    closure()
    with pytest.raises(TypeError):
        opt.step()
    assert opt.state_dict()["param_groups"][0]["weight_decay"] == 0.1  # a checkpoint never records the 0
    assert opt.param_groups[0]["weight_decay"] == 0.1
    handle.remove()
    for n, p in model.named_parameters():
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        assert bool((p.detach()[m] != before[n][m]).any()), n


def test_masks_are_compact_and_no_value_is_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512))
    sel = gradsel.select(model, None, "random", keep=0.005, progress=False)
    sel.masks["2.bias"][:] = True  # share 1 leaves no mask at all
    sel.masks["0.bias"][:64] = True  # share > 1/32: bit-packed
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    from benchmarks.apply_memory import handle_tensor_bytes

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with sel.apply(model, opt) as handle:
        held = handle_tensor_bytes(handle, model, opt)
        weight = handle.guards["0.weight"].entries
        assert weight.index is not None and weight.index.dtype == torch.int32
        assert weight.nbytes() == 4 * int(sel.masks["0.weight"].sum()) + 8  # + the 8 bit shifts
        assert handle.guards["0.bias"].entries.bits.numel() == 512 // 8
        assert handle.guards["2.bias"].entries is None
    assert held == sum(g.entries.nbytes() for g in handle.guards.values() if g.entries is not None)
    assert held <= param_bytes / 8, (held, param_bytes)


def test_done_and_trainable_share():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "fish", keep=0.25, always="3.*", progress=False)
    with sel.apply(model, torch.optim.SGD(model.parameters(), lr=0.1)) as handle:
        assert handle.done is False
        assert handle.trainable_share == pytest.approx(sel.trainable() / sum(p.numel() for p in model.parameters()))
        handle.controller = type("C", (), {"done": True, "trainable_share": lambda self: 0.125})()
        assert handle.done is True and handle.trainable_share == 0.125
        handle.controller = None


# -- wrappers: torch.compile, DDP ------------------------------------------------------------------------------
def _masked_run(sel, train_model, params_model, steps=3):
    opt = torch.optim.AdamW(params_model.parameters(), lr=0.01, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in params_model.named_parameters()}
    with sel.apply(train_model, opt) as handle:
        _train(train_model, opt, steps, handle)
    for n, p in params_model.named_parameters():
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        assert bool((p.detach()[m] != before[n][m]).all()), n


def test_a_selection_applies_across_torch_compile_both_ways():
    model = M.mlp()
    compiled = torch.compile(model, backend="eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    sel = gradsel.select(model, M.mlp_batch(), "fish", keep=0.3, progress=False)
    sel_compiled = gradsel.select(compiled, M.mlp_batch(), "fish", keep=0.3, progress=False)
    assert sel_compiled.candidates == sel.candidates == list(dict(model.named_parameters()))
    assert all(torch.equal(sel.masks[n], sel_compiled.masks[n]) for n in sel.masks)
    _masked_run(sel, compiled, model)
    _masked_run(sel_compiled, model, model)
    assert gradsel.params.resolve(compiled, "0.*") == ["0.weight", "0.bias"]
    with pytest.raises(GradselError, match=r"wrapper prefix '_orig_mod\.'.*pass params='0\.\*'"):
        gradsel.select(compiled, None, "random", keep=3, params="_orig_mod.0.*", progress=False)


def test_a_selection_with_wrapper_prefixes_from_an_older_version_is_mapped_with_a_warning():
    model = M.mlp()
    plain = gradsel.select(model, None, "random", keep=0.3, progress=False)
    for prefix in ("_orig_mod.", "module.", "module._orig_mod."):
        old = gradsel.Selection({prefix + n: m for n, m in plain.masks.items()}, policy="random",
                                candidates=[prefix + n for n in plain.candidates])
        with pytest.warns(UserWarning, match=f"wrapper prefix {prefix!r}.*Save the selection again"):
            _masked_run(old, model, model)
        assert old.candidates == plain.candidates and list(old.shapes) == list(plain.shapes)


def test_names_that_match_nothing_say_which_prefix_differs():
    inner = M.mlp()
    outer = nn.Sequential()
    outer.add_module("body", inner)
    on_inner = gradsel.select(inner, None, "random", keep=0.3, progress=False)
    on_outer = gradsel.select(outer, None, "random", keep=0.3, progress=False)
    with pytest.raises(GradselError, match=r"model's parameter names carry a prefix 'body\.'.*submodule model\.body"):
        on_inner.apply(outer)
    with pytest.raises(GradselError, match=r"selection's parameter names carry a prefix 'body\.'.*holds this one as \.body"):
        on_outer.apply(inner)
    with pytest.raises(GradselError, match=r"does not have: it was made for a different model.*names look like conv1"):
        on_inner.apply(M.cnn())


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_selection_applies_to_a_ddp_wrapped_model_and_back():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = M.mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert next(iter(dict(ddp.named_parameters()))).startswith("module.")
        sel = gradsel.select(ddp, None, "random", keep=0.5, progress=False)
        assert sel.candidates == list(dict(model.named_parameters()))
        assert all(bool(m.any()) for m in sel.masks.values())  # nothing frozen whole: DDP keeps its buckets
        _masked_run(sel, ddp, model)
        _masked_run(sel, model, model)
        old = gradsel.Selection({"module." + n: m for n, m in sel.masks.items()}, policy="random",
                                candidates=["module." + n for n in sel.candidates])
        with pytest.warns(UserWarning, match="wrapper prefix 'module.'"):
            _masked_run(old, ddp, model)
    finally:
        dist.destroy_process_group()
