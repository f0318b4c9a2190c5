"""SparseAdamW: dense AdamW's trajectory under the mask, with state for the selected elements only."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.optim import SparseAdamW, sparse_adamw, state_bytes

from . import models as M


pytestmark = pytest.mark.usefixtures("one_thread")


def _bert_loss(model, batch):
    return model(**batch).loss


def _unet_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


CASES = {
    "bert": (M.bert, lambda s: M.bert_batch(n=8, seed=s), _bert_loss, "classifier.*"),
    "unet": (M.unet, lambda s: M.unet_batch(n=2, size=32, seed=s), _unet_loss, "segmentation_head.*"),
}


def _trajectory(case, steps, sparse, keep=0.05, **kw):
    make, batch_fn, loss_fn, always = CASES[case]
    model = make()
    start = copy.deepcopy(model.state_dict())
    sel = gradsel.select(model, None, "random", keep=keep, always=always, seed=3, progress=False)
    batches = [batch_fn(s) for s in range(steps)]
    torch.manual_seed(0)  # same dropout draws in both runs
    if sparse:
        opt, handle = sparse_adamw(sel, model, lr=1e-2, weight_decay=0.1, **kw), None
    else:
        fused = kw.get("fused", True)  # the reference runs the arithmetic SparseAdamW runs
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                **({"fused": True} if fused else {"foreach": False}))
        handle = sel.apply(model, opt)
    model.train()
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    if handle is not None:
        handle.remove()
    return sel, start, model, opt


# The single-tensor arithmetic gives every element the same bits wherever it sits, so the trajectories agree
# over 100 steps. The fused kernel's vectorised body and scalar tail round differently (one ulp), and on
# these small models one ulp grows to 1e-2 within ten steps, so its trajectory is compared over three.
@pytest.mark.parametrize("case,steps,fused", [("bert", 100, False), ("unet", 100, False), ("bert", 3, True),
                                              ("unet", 3, True)])
def test_trajectory_equals_dense_adamw_with_the_selection_applied(case, steps, fused):
    sel, start, dense, _ = _trajectory(case, steps, sparse=False, fused=fused)
    _, _, sparse, opt = _trajectory(case, steps, sparse=True, fused=fused)
    worst = max((a.double() - b.double()).abs().max().item()
                for a, b in zip(dense.state_dict().values(), sparse.state_dict().values()))
    assert worst <= 1e-6, f"{case}: max abs difference {worst} after {steps} steps"
    params = dict(sparse.named_parameters())
    moved = trained = 0
    for name, mask in sel.masks.items():
        after, before = params[name].detach(), start[name]
        assert torch.equal(after[~mask], before[~mask]), f"masked entries of {name} moved"
        if params[name].grad is not None:  # the Unet's encoder_depth=3 leaves layer4 unused: no gradient
            moved += int((after[mask] != before[mask]).sum())
            trained += int(mask.sum())
    assert moved > 0.9 * trained > 0
    # everything outside the selection is untouched too
    for name, p in params.items():
        if name not in sel.masks:
            assert torch.equal(p.detach(), start[name]), name


def test_state_holds_only_the_selected_elements():
    model = M.bert()
    sel = gradsel.select(model, None, "random", keep=0.02, always="classifier.*", progress=False)
    sel.masks["bert.pooler.dense.bias"][:] = False  # one tensor with nothing selected
    opt = sparse_adamw(sel, model, lr=1e-3)
    params = dict(model.named_parameters())
    assert not params["bert.pooler.dense.bias"].requires_grad and "bert.pooler.dense.bias" in opt.frozen
    assert params["bert.pooler.dense.bias"] not in opt._index
    model(**M.bert_batch()).loss.backward()
    assert params["bert.pooler.dense.bias"].grad is None  # backward skipped it
    opt.step()
    expected = 0
    for name, mask in sel.masks.items():
        p, count = params[name], int(mask.sum())
        if count == 0:
            assert p not in opt.state
            continue
        st = opt.state[p]
        if count == mask.numel():  # the always= head: dense state
            assert st["exp_avg"].shape == p.shape and opt._index[p] is None
            expected += 2 * 4 * count + 4
        else:
            assert st["exp_avg"].shape == (count,) and st["exp_avg_sq"].shape == (count,)
            assert opt._index[p].dtype == torch.int32
            assert torch.equal(opt._index[p].long(), mask.reshape(-1).nonzero().squeeze(1))
            expected += (2 * 4 + 4) * count + 4
    assert opt.state_bytes() == state_bytes(opt) == expected
    dense = torch.optim.AdamW(M.bert().parameters())
    for p in dense.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    dense.step()
    assert expected < 0.1 * state_bytes(dense)


def test_masked_gradient_entries_are_never_read():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "fish", keep=0.3, progress=False)
    twin = copy.deepcopy(model)
    opt, opt2 = sparse_adamw(sel, model, lr=0.05), sparse_adamw(sel, twin, lr=0.05)
    x, y = M.mlp_batch(seed=4)
    for m, o, poison in ((model, opt, True), (twin, opt2, False)):
        torch.manual_seed(0)
        nn.functional.cross_entropy(m(x), y).backward()
        if poison:
            for name, p in m.named_parameters():
                if p.grad is not None:
                    p.grad[~sel.masks[name]] = float("nan")
        o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


def test_amsgrad_maximize_and_no_decay_group_match_torch():
    def run(sparse):
        model = M.mlp()
        sel = gradsel.select(model, M.mlp_batch(n=32), "fish", keep=0.25, always="3.bias", progress=False)
        torch.manual_seed(1)
        kw = dict(lr=0.02, weight_decay=0.2, amsgrad=True, maximize=True)
        if sparse:
            opt, handle = sparse_adamw(sel, model, no_decay="*.bias", **kw), None
        else:
            decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
            nodecay = [p for n, p in model.named_parameters() if n.endswith("bias")]
            opt = torch.optim.AdamW([{"params": decay}, {"params": nodecay, "weight_decay": 0.0}], **kw)
            handle = sel.apply(model, opt)
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            opt.zero_grad()
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            (-nn.functional.cross_entropy(model(x), y)).backward()
            opt.step()
        if handle:
            handle.remove()
        return model

    a, b = run(False), run(True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() <= 1e-6, name
    assert not torch.equal(a[0].weight, M.mlp()[0].weight)


@pytest.mark.parametrize("fused,amsgrad,maximize", [(True, False, False), (True, True, True), (False, False, False),
                                                     (False, True, False)])
def test_updates_are_torchs_adamw_bit_for_bit(monkeypatch, fused, amsgrad, maximize):
    """The default path is torch's fused AdamW kernel, the other its single-tensor update in pieces (so that the
    square-root temporary of a large tensor stays small; a last piece shorter than the rest here): each gives
    the matching torch optimizer bit for bit on the trained elements, for a whole tensor and a masked one,
    and leaves the masked elements untouched."""
    import gradsel.optim as optim

    monkeypatch.setattr(optim, "CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    dense, masked = torch.randn(37, 11, generator=g), torch.randn(29, 13, generator=g)
    mask = torch.rand(29, 13, generator=g) < 0.6  # 200+ selected elements: several pieces
    ours = [nn.Parameter(dense.clone()), nn.Parameter(masked.clone())]
    theirs = [nn.Parameter(dense.clone()), nn.Parameter(masked.clone())]
    kw = dict(lr=0.05, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt = SparseAdamW([ours[0], (ours[1], mask)], fused=fused, **kw)
    ref = torch.optim.AdamW(theirs, **({"fused": True} if fused else {"foreach": False}), **kw)
    for _ in range(5):
        grads = [torch.randn(t.shape, generator=g) for t in ours]
        for a, b, gr in zip(ours, theirs, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        theirs[1].grad[~mask] = 0
        before = theirs[1].detach().clone()
        opt.step()
        ref.step()
        with torch.no_grad():  # the reference moves masked entries by weight decay: put them back
            theirs[1][~mask] = before[~mask]
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1][mask], theirs[1][mask]) and torch.equal(ours[1][~mask], masked[~mask])
    assert not torch.equal(ours[0], dense)


def test_compact_grads_accumulate_and_clip_like_the_masked_dense_path():
    def run(mode):
        model = M.mlp()
        sel = gradsel.select(model, M.mlp_batch(n=32), "random", keep=0.3, always="3.bias", progress=False)
        if mode == "dense":
            opt = torch.optim.AdamW(model.parameters(), lr=0.05)
            handle = sel.apply(model, opt)
        else:
            opt, handle = sparse_adamw(sel, model, lr=0.05, compact_grads=(mode == "compact")), None
        g = torch.Generator().manual_seed(0)
        norms = []
        for _ in range(10):
            opt.zero_grad()
            for _ in range(2):  # gradient accumulation over two micro-batches
                x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                (nn.functional.cross_entropy(model(x), y) * 3).backward()
            if mode == "compact":
                assert model[0].weight.grad is None  # the dense gradient was gathered and freed
            if mode == "dense":
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
            else:
                norms.append(float(opt.clip_grad_norm_(0.5)))
            opt.step()
        if handle:
            handle.remove()
        return model, norms

    (dense, n1), (plain, n2), (compact, n3) = run("dense"), run("plain"), run("compact")
    assert n1[0] > 0.5  # clipping was active
    assert max(abs(a - b) for a, b in zip(n1, n2)) < 1e-5 and n2 == n3
    for p, q, r in zip(dense.parameters(), plain.parameters(), compact.parameters()):
        assert (p - q).abs().max() <= 1e-6 and torch.equal(q, r)


@pytest.mark.parametrize("compact_grads", [False, True])
def test_channels_last_models_train_as_their_contiguous_twins(compact_grads):
    # a channels_last conv weight is not a flat view in its logical order: the selected (logical) indices are moved
    # through its strides, so the same elements train as under dense AdamW with the selection applied
    def run(sparse, channels_last):
        model = M.unet().double()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        start = copy.deepcopy(model.state_dict())
        if sparse:
            opt, handle = sparse_adamw(sel, model, lr=1e-2, weight_decay=0.1, compact_grads=compact_grads), None
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
            handle = sel.apply(model, opt)
        for seed in range(3):
            x, y = M.unet_batch(n=2, size=32, seed=seed)
            opt.zero_grad()
            _unet_loss(model, (x.double().contiguous(memory_format=torch.channels_last) if channels_last else
                               x.double(), y)).backward()
            opt.step()
        if handle is not None:
            handle.remove()
        return model, start

    sel = gradsel.select(M.unet(), None, "random", keep=0.05, always="segmentation_head.*", seed=3, progress=False)
    (sparse, start), (dense, _) = run(True, True), run(False, True)
    w = dict(sparse.named_parameters())["encoder.layer1.0.conv1.weight"]
    assert not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    assert max((a - b).abs().max().item() for a, b in zip(sparse.parameters(), dense.parameters())) <= 1e-10
    params, reached, moved, trained = dict(sparse.named_parameters()), dict(dense.named_parameters()), 0, 0
    for name, mask in sel.masks.items():
        after, before = params[name].detach(), start[name]
        assert torch.equal(after[~mask], before[~mask]), name
        if reached[name].grad is not None:  # the test Unet's encoder_depth=3 leaves layer3 and layer4 unused
            moved += int((after[mask] != before[mask]).sum())
            trained += int(mask.sum())
    assert moved > 0.9 * trained > 0
    twin, _ = run(True, False)  # the contiguous model ends where the channels_last one does
    assert max((a - b).abs().max().item() for a, b in zip(sparse.parameters(), twin.parameters())) <= 1e-8


class _Bag(nn.Module):
    """Token ids → embedding rows → mean → classifier: what a sparse embedding feeds in a text model."""

    def __init__(self, sparse: bool):
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Embedding(30, 6, sparse=sparse)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("compact_grads", [False, True])
def test_sparse_embedding_gradients_follow_the_dense_trajectory(compact_grads):
    # nn.Embedding(sparse=True) gives the rows a batch looked up; selected rows it did not look up have a zero
    # gradient, and AdamW still moves them (momentum, weight decay) as it does with a dense embedding
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 10 if i % 2 else 30, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g))
               for i in range(6)]  # every other batch looks up rows 0-9 only
    sel = gradsel.select(_Bag(False), None, "random", keep=0.4, seed=1, progress=False)
    assert bool(sel.masks["emb.weight"][10:].any())  # selected rows that half of the batches leave out

    def run(sparse):
        model = _Bag(sparse)
        start = model.emb.weight.detach().clone()
        opt = sparse_adamw(sel, model, lr=0.05, weight_decay=0.1, compact_grads=compact_grads and sparse)
        for ids, y in batches:
            opt.zero_grad()
            for half in (slice(0, 2), slice(2, 4)):  # two backwards accumulate: repeated rows in the sparse grad
                nn.functional.cross_entropy(model(ids[half]), y[half]).backward()
            if sparse and not compact_grads:
                assert model.emb.weight.grad.is_sparse
            opt.step()
        return model, start

    (dense, start), (sparse, _) = run(False), run(True)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        assert (a - b).abs().max() <= 1e-6
    mask = sel.masks["emb.weight"]
    assert torch.equal(sparse.emb.weight[~mask], start[~mask])
    assert bool((sparse.emb.weight[mask] != start[mask]).all())  # rows 10-29 moved in the batches without them


def test_state_dict_round_trip_continues_the_same_trajectory():
    def fresh():
        model = M.mlp()
        sel = gradsel.select(model, M.mlp_batch(n=32), "fish", keep=0.3, always="3.*", progress=False)
        opt = sparse_adamw(sel, model, lr=0.05, weight_decay=0.1)
        return model, sel, opt, torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5)

    def train(model, opt, sched, steps, seed):
        torch.manual_seed(seed)  # dropout
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

    model, sel, opt, sched = fresh()
    train(model, opt, sched, 5, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    train(model, opt, sched, 5, 1)

    buf.seek(0)
    ckpt = torch.load(buf)
    model2, _, opt2, sched2 = fresh()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2._index[model2[0].weight].dtype == torch.int32
    train(model2, opt2, sched2, 5, 1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)

    # a checkpoint of another selection, or of a dense optimizer, is refused
    other = M.mlp()
    sel_other = gradsel.select(other, None, "random", keep=0.3, always="3.*", seed=9, progress=False)
    with pytest.raises(GradselError, match="different selection"):
        sparse_adamw(sel_other, other, lr=0.05).load_state_dict(ckpt["opt"])
    with pytest.raises(GradselError, match="not saved by SparseAdamW"):
        opt2.load_state_dict(torch.optim.AdamW(model2.parameters()).state_dict())


def test_bad_masks_are_refused():
    w = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(GradselError, match="no selected element"):
        SparseAdamW([(w, torch.zeros(3, 4, dtype=torch.bool))])
    with pytest.raises(GradselError, match=r"parameter's shape \(3, 4\)"):
        SparseAdamW([(w, torch.ones(4, 3, dtype=torch.bool))])
    with pytest.raises(GradselError, match="without gaps in memory"):  # a permuted layout is fine, a strided view not
        SparseAdamW([(nn.Parameter(torch.zeros(3, 8)[:, ::2]), torch.eye(3, 4, dtype=torch.bool))])
