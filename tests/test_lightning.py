"""PyTorch Lightning with gradsel: masked entries stay, checkpoints resume bit for bit, jsdrift freezes."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradsel

L = pytest.importorskip("lightning")
from gradsel.integrations.lightning import GradselCallback, sparse_optimizer  # noqa: E402
from gradsel.optim import SparseAdamW  # noqa: E402


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def _data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Net(L.LightningModule):
    def __init__(self, selection=None, sparse=False):
        super().__init__()
        self.model = _net()
        self.selection, self.sparse = selection, sparse

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        if self.sparse:
            opt = sparse_optimizer(self.selection, self.model, lr=0.05, weight_decay=0.1,
                                   no_decay=["*.bias", nn.LayerNorm])
        else:
            named = dict(self.model.named_parameters())  # the same no-decay rule: Linear weights decay only
            groups = [{"params": [named["0.weight"], named["3.weight"]]},
                      {"params": [p for n, p in named.items() if n not in ("0.weight", "3.weight")], "weight_decay": 0.0}]
            opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1, foreach=False)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=4, shuffle=False)


class _StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _fit(selection, *, sparse, steps, ckpt=None, save=None, extra=(), **callback_options):
    """Fit a fresh Net; ``save=(folder, step)`` writes a Lightning checkpoint at that step and stops there."""
    net = Net(selection, sparse)
    callbacks = [GradselCallback(selection, module="model", **callback_options), *extra]
    if save is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks += [ModelCheckpoint(dirpath=save[0], filename="cut", every_n_train_steps=save[1]), _StopAt(save[1])]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=save is not None, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.05, callbacks=callbacks)
    trainer.fit(net, _loader(), ckpt_path=ckpt)
    return net.model, trainer


def _fish():
    return gradsel.select(_net(), _data(), "fish", keep=20, always="3.*", progress=False)


def _jsdrift(**kw):
    opts = dict(interval=2, source="train", rule="relative", lam=0.0, patience=2, blocks=2, floor=0.3)
    opts.update(kw)
    opts = {k: v for k, v in opts.items() if v is not None}  # None: the policy's default
    return gradsel.select(_net(), _data(), "jsdrift", progress=False, **opts)


def test_importing_gradsel_does_not_import_lightning():
    code = "import sys, gradsel, gradsel.optim; print('lightning' in sys.modules, 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("sparse", [False, True])
def test_masked_entries_unchanged_and_sparse_equals_dense(sparse):
    sel = _fish()
    start = {n: p.detach().clone() for n, p in _net().named_parameters()}
    model, trainer = _fit(copy.deepcopy(sel), sparse=sparse, steps=12)
    assert trainer.global_step == 12
    for n, p in model.named_parameters():
        m = sel.masks[n]
        assert torch.equal(p.detach()[~m], start[n][~m]), n
    assert sum(int((p.detach() != start[n]).sum()) for n, p in model.named_parameters()) == sel.trainable()
    if sparse:  # the same trajectory as the guarded dense AdamW (clipping over the selected entries, scheduler)
        opt = trainer.optimizers[0]
        assert isinstance(opt, SparseAdamW) and opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.7**4)
        dense, _ = _fit(copy.deepcopy(sel), sparse=False, steps=12)
        for p, q in zip(model.parameters(), dense.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy,sparse", [("fish", True), ("fish", False), ("jsdrift", True), ("jsdrift", False)])
def test_resume_from_a_lightning_checkpoint_is_bit_identical(tmp_path, policy, sparse):
    sel = _fish() if policy == "fish" else _jsdrift()
    whole, _ = _fit(copy.deepcopy(sel), sparse=sparse, steps=16)
    _, cut = _fit(copy.deepcopy(sel), sparse=sparse, steps=16, save=(tmp_path, 8))
    assert cut.global_step == 8 and "GradselCallback" in torch.load(tmp_path / "cut.ckpt", weights_only=True)["callbacks"]
    resumed_sel = copy.deepcopy(sel)
    resumed, trainer = _fit(resumed_sel, sparse=sparse, steps=16, ckpt=tmp_path / "cut.ckpt")
    assert trainer.global_step == 16
    for (n, p), q in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    if policy == "jsdrift":
        frozen = resumed_sel.info["jsdrift"]["frozen"]
        assert any(step > 8 for step in frozen.values())  # freezes decided after the resume point


class _Watch(L.Callback):
    """Records, after every step, which tensors require grad and their values (runs after GradselCallback)."""

    def __init__(self):
        self.grad, self.values = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        named = list(pl_module.model.named_parameters())
        self.grad[trainer.global_step] = {n: p.requires_grad for n, p in named}
        self.values[trainer.global_step] = {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("sparse", [False, True])
def test_jsdrift_freezes_whole_tensors_through_the_callback(sparse):
    sel = _jsdrift(patience=1, blocks=1)  # below-mean drift once: freeze (whole tensors), some group always left
    watch = _Watch()
    model, trainer = _fit(sel, sparse=sparse, steps=12, extra=[watch])
    assert trainer.global_step == 12
    frozen = sel.info["jsdrift"]["frozen"]
    assert frozen and min(frozen.values()) < 12
    params, opt = dict(model.named_parameters()), trainer.optimizers[0]
    for name, step in frozen.items():  # from the freeze on: no grad required, state released, value still
        assert all(watch.grad[s][name] is False for s in range(step, 13)) and watch.grad[step - 1][name]
        assert torch.equal(params[name].detach(), watch.values[step][name]), name
        assert params[name] not in opt.state
    assert any(watch.grad[12][n] for n in params)
    assert all(p.requires_grad for p in model.parameters())  # on_fit_end removed the handle


def test_training_stops_when_jsdrift_is_done():
    sel = _jsdrift(rule="threshold", threshold=1.0, patience=1, blocks=1, floor=None)
    model, trainer = _fit(sel, sparse=True, steps=40)
    # training gradients: the first distribution at step 2, the first drift at step 4, where every group is stable
    assert set(sel.info["jsdrift"]["frozen"].values()) == {4}
    assert len(sel.info["jsdrift"]["frozen"]) == 5  # the default floor keeps one of the six tensors
    assert trainer.global_step == 4  # handle.done stopped training


def test_stop_when_done_false_trains_the_floor_for_every_step():
    sel = _jsdrift(rule="threshold", threshold=1.0, patience=1, blocks=1, floor=None)
    model, trainer = _fit(sel, sparse=True, steps=12, stop_when_done=False)
    assert set(sel.info["jsdrift"]["frozen"].values()) == {4} and len(sel.info["jsdrift"]["frozen"]) == 5
    assert trainer.global_step == 12
    kept = [n for n, m in sel.masks.items() if bool(m.any())]
    assert len(kept) == 1  # the floor's tensor ...
    stopped, _ = _fit(_jsdrift(rule="threshold", threshold=1.0, patience=1, blocks=1, floor=None), sparse=True,
                      steps=12)
    for n in sel.masks:
        assert torch.equal(model.get_parameter(n), stopped.get_parameter(n)) == (n != kept[0])  # ... moved after step 4
