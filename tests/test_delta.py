"""SparseDelta: exact merge onto the base, exact unmerge, and clear failures on wrong bases and bad files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.delta import SparseDelta, fingerprint
from gradsel.optim import sparse_adamw

from . import models as M


pytestmark = pytest.mark.usefixtures("one_thread")


def _finetune_bert(steps=5, keep=0.01):
    model = M.bert()
    base = copy.deepcopy(model.state_dict())
    sel = gradsel.select(model, M.bert_batch(n=16), "fish", keep=keep, always="classifier.*", progress=False)
    opt = sparse_adamw(sel, model, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    for s in range(steps):
        opt.zero_grad()
        model(**M.bert_batch(n=8, seed=s)).loss.backward()
        opt.step()
    return model.eval(), base, sel


@pytest.fixture(scope="module")
def bert_run():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _finetune_bert()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("base_values", [True, False])
def test_merge_reproduces_the_finetuned_model_bit_for_bit_and_unmerge_restores_the_base(bert_run, tmp_path,
                                                                                         base_values):
    tuned, base, sel = bert_run
    delta = SparseDelta.from_models(sel, tuned, base, base_values=base_values)
    assert 0 < delta.numel() <= sel.trainable()
    path = delta.save(tmp_path / "delta.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = SparseDelta.load(path)
    assert loaded.selection["policy"] == "fish" and loaded.selection["budget"] == sel.budget

    fresh = M.bert().eval()
    fresh.load_state_dict(base)
    batch = M.bert_batch(n=6, seed=11)
    assert not torch.equal(fresh(**batch).logits, tuned(**batch).logits)
    loaded.merge(fresh)
    assert torch.equal(fresh(**batch).logits, tuned(**batch).logits)
    for (name, a), b in zip(fresh.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(GradselError, match="already merged"):
        loaded.merge(fresh)
    if base_values:
        loaded.unmerge(fresh)
    else:
        with pytest.raises(GradselError, match="pass the base state dict"):
            loaded.unmerge(fresh)
        wrong = M.bert(seed=5).state_dict()
        with pytest.raises(GradselError, match="not the base"):
            loaded.unmerge(fresh, wrong)
        loaded.unmerge(fresh, base)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, base[name]), name
    with pytest.raises(GradselError, match="not merged"):
        loaded.unmerge(fresh, base)


def test_sizes_index_and_values_only_for_what_changed(bert_run, tmp_path):
    tuned, base, sel = bert_run
    with_base = SparseDelta.from_models(sel, tuned, base)
    without = SparseDelta.from_models(sel, tuned, base, base_values=False)
    for e in with_base.entries:
        if e.index is not None:
            assert e.index.dtype == torch.int32
            assert bool(sel.masks[e.name].reshape(-1)[e.index.long()].all())  # inside the selection
    sparse = sum(e.values.numel() for e in with_base.entries if e.index is not None)
    dense = sum(e.values.numel() for e in with_base.entries if e.index is None)
    assert with_base.nbytes() == sparse * 12 + dense * 8 and without.nbytes() == sparse * 8 + dense * 4
    full = sum(t.numel() * t.element_size() for t in tuned.state_dict().values())
    size = without.save(tmp_path / "d.safetensors").stat().st_size
    assert without.nbytes() < size < 0.3 * full


def test_unet_batchnorm_statistics_travel_with_the_delta(tmp_path):
    model = M.unet()
    base = copy.deepcopy(model.state_dict())
    sel = gradsel.select(model, None, "random", keep=0.01, always="segmentation_head.*", progress=False)
    opt = sparse_adamw(sel, model, lr=1e-2)
    for s in range(3):
        opt.zero_grad()
        x, y = M.unet_batch(n=2, seed=s)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    delta = SparseDelta.from_models(sel, model, base)
    stored = {e.name: e for e in delta.entries}
    assert stored["encoder.bn1.running_mean"].index is None  # buffers are stored whole
    fresh = M.unet().eval()
    fresh.load_state_dict(base)
    SparseDelta.load(delta.save(tmp_path / "u.safetensors")).merge(fresh)
    x = M.unet_batch(n=2, seed=9)[0]
    assert torch.equal(fresh(x), model(x))


def test_a_different_base_fails_clearly(bert_run):
    tuned, base, sel = bert_run
    delta = SparseDelta.from_models(sel, tuned, base)
    with pytest.raises(GradselError, match=r"different base model: .* is \(48,\) float32 in the model but \(32,\)"):
        delta.merge(M.bert(hidden=48))
    with pytest.raises(GradselError, match="different base model: the model lacks"):
        delta.merge(M.bert(layers=1))
    other = M.bert(seed=7)  # same names and shapes, another checkpoint
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(GradselError, match="different checkpoint"):
        delta.merge(other)
    no_base = SparseDelta.from_models(sel, tuned, base, base_values=False)
    with pytest.raises(GradselError, match="different checkpoint"):
        no_base.merge(other)
    for name, t in other.state_dict().items():  # nothing was written
        assert torch.equal(t, before[name])
    assert fingerprint(base) == delta.fingerprint != fingerprint(M.bert(hidden=48).state_dict())


def test_truncated_corrupted_and_foreign_files_fail(bert_run, tmp_path):
    tuned, base, sel = bert_run
    path = SparseDelta.from_models(sel, tuned, base).save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 20):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(GradselError, match="truncated or corrupted"):
            SparseDelta.load(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0x01  # a bit in the last tensor's data: safetensors itself cannot see it
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(GradselError, match="corrupted"):
        SparseDelta.load(tmp_path / "flip.safetensors")
    sel_path = sel.save(tmp_path / "sel.safetensors")
    with pytest.raises(GradselError, match="not a gradsel delta"):
        SparseDelta.load(sel_path)
    with pytest.raises(GradselError, match="no delta file"):
        SparseDelta.load(tmp_path / "missing.safetensors")


def test_an_interrupted_save_leaves_no_file_under_the_final_name(bert_run, tmp_path, monkeypatch):
    import safetensors.torch

    tuned, base, sel = bert_run
    delta = SparseDelta.from_models(sel, tuned, base)
    final = tmp_path / "d.safetensors"
    final.write_bytes(b"previous version")

    def half_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        delta.save(final)
    assert final.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_changes_outside_the_selection_are_refused():
    model = M.mlp()
    base = copy.deepcopy(model.state_dict())
    sel = gradsel.select(model, None, "random", keep=5, params="0.weight", progress=False)
    with torch.no_grad():
        model[0].weight.add_(sel.masks["0.weight"].float())  # inside
        model[0].weight[0, 0] += 1 if not sel.masks["0.weight"][0, 0] else 0
        model[3].bias += 1  # a parameter outside the selection
    with pytest.raises(GradselError, match=r"outside the selection: .*3.bias \(3 elements\)"):
        SparseDelta.from_models(sel, model, base)
    with pytest.warns(UserWarning, match="left out"):
        delta = SparseDelta.from_models(sel, model, base, strict=False)
    assert [e.name for e in delta.entries] == ["0.weight"] and delta.numel() == 5


def test_selection_shorthands_train_only_the_selection_and_ship_it_as_a_delta(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    base = copy.deepcopy(model.state_dict())
    sel = gradsel.select(model, (x, y), "fish", keep=10, always="2.bias", progress=False)
    opt = sel.optimizer(model, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    changed = {n: (p.detach() != base[n]) for n, p in model.named_parameters()}
    assert sum(int(c.sum()) for c in changed.values()) > 0
    for n, c in changed.items():
        assert not bool((c & ~sel.masks[n]).any()), f"{n} moved outside the selection"
    delta = sel.delta(model, base)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    fresh.load_state_dict(base)
    SparseDelta.load(delta.save(tmp_path / "d.safetensors")).merge(fresh)
    for (n, a), b in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n
