"""Row budgets (``granularity="row"``) and the row-sparse backward (``gradsel.rowsparse``), in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel.fisher import Fisher
from gradsel.optim import sparse_adamw
from gradsel.policies.base import row_units, top_rows
from gradsel.rowsparse import _taps_weight_grad, row_sparse

from . import models as M

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the reference: rows by a plain Python sort ---------------------------------------------------------------

def reference_rows(scores: dict[str, torch.Tensor], k: int, largest: bool = True) -> dict[str, torch.Tensor]:
    """Whole rows by (mass, position) in rank order while they fit, then the next row's best entries.

    Rows are built without gradsel's helper: ``<m>.weight`` (≥2-D) row i with ``<m>.bias[i]`` when that bias
    exists with the same dim 0; any other tensor's entries are rows of one element.
    """
    rows = []  # (mass, position, [(name, flat index, score)])
    names = list(scores)
    for name in names:
        t = scores[name].double()
        if name.endswith("bias") and t.dim() == 1:
            w = name[:-4] + "weight"
            if w in scores and scores[w].dim() >= 2 and scores[w].shape[0] == t.shape[0]:
                continue  # joined to its weight below
        bias = name[:-6] + "bias" if name.endswith("weight") else None
        joined = t.dim() >= 2 and bias in scores and scores[bias].dim() == 1 and scores[bias].shape[0] == t.shape[0]
        if t.dim() >= 2:
            width = t[0].numel()
            for i in range(t.shape[0]):
                entries = [(name, i * width + j, float(t.reshape(t.shape[0], -1)[i, j])) for j in range(width)]
                if joined:
                    entries.append((bias, i, float(scores[bias][i])))
                rows.append(entries)
        else:
            rows += [[(name, j, float(v))] for j, v in enumerate(t.reshape(-1).tolist())]
    sign = -1 if largest else 1
    order = sorted(range(len(rows)), key=lambda r: (sign * sum(e[2] for e in rows[r]), r))
    out = {n: torch.zeros(scores[n].numel(), dtype=torch.bool) for n in names}
    left = k
    for r in order:
        entries = rows[r]
        if len(entries) <= left:
            for name, j, _ in entries:
                out[name][j] = True
            left -= len(entries)
            continue
        for e in sorted(range(len(entries)), key=lambda e: (sign * entries[e][2], e))[:left]:
            out[entries[e][0]][entries[e][1]] = True
        break
    return {n: m.reshape(scores[n].shape) for n, m in out.items()}


def tied_scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc.weight": (5, 4), "fc.bias": (5,), "norm.weight": (4,), "conv.weight": (3, 2, 2, 2),
              "conv.bias": (3,), "lone.bias": (6,), "scale": ()}
    return {n: torch.randint(0, 3, s, generator=g).to(torch.float64 if i % 2 else torch.float32)
            for i, (n, s) in enumerate(shapes.items())}


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_top_rows_matches_a_python_sort_with_ties(seed, largest):
    scores = tied_scores(seed)
    total = sum(t.numel() for t in scores.values())
    for k in (0, 1, 4, 5, 6, 17, 33, total - 1, total):
        got, info = top_rows(scores, k, largest=largest)
        expected = reference_rows(scores, k, largest)
        assert all(torch.equal(got[n], expected[n]) for n in scores), (k, largest)
        assert sum(int(m.sum()) for m in got.values()) == k


def test_row_units_pair_biases_with_their_weight_rows():
    shapes = {n: t.shape for n, t in tied_scores(0).items()}
    assert row_units(shapes) == [("fc.weight", "fc.bias"), ("norm.weight",), ("conv.weight", "conv.bias"),
                                 ("lone.bias",), ("scale",)]


def _row_structure(masks, units):
    """(rows taken whole, rows taken partly) over the row units."""
    whole = partial = 0
    for unit in units:
        rows = masks[unit[0]].shape[0] if masks[unit[0]].dim() >= 2 else masks[unit[0]].numel()
        per_row = torch.cat([masks[n].reshape(rows, -1) for n in unit], 1) if rows else torch.zeros(0, 0)
        counts = per_row.sum(1)
        whole += int((counts == per_row.shape[1]).sum())
        partial += int(((counts > 0) & (counts < per_row.shape[1])).sum())
    return whole, partial


@pytest.mark.parametrize("policy", ["fish", "reverse", "random"])
@pytest.mark.parametrize("keep", [0.1, 0.37, 50, 1.0])
def test_row_policies_keep_exactly_k_in_whole_rows_but_one(policy, keep):
    model = M.mlp()
    batch = M.mlp_batch(n=16)
    sel = gradsel.select(model, batch, policy, keep=keep, granularity="row", progress=False)
    k = keep if isinstance(keep, int) else round(keep * sel.total())
    assert sel.selected() == k == sel.budget
    units = row_units(sel.shapes)
    whole, partial = _row_structure(sel.masks, units)
    assert partial <= 1
    assert (sel.info["rows"]["partial_row"] is not None) == (partial == 1)
    assert whole == sel.info["rows"]["whole_rows"]
    again = gradsel.select(model, batch, policy, keep=keep, granularity="row", progress=False)
    assert all(torch.equal(sel.masks[n], again.masks[n]) for n in sel.masks)


@pytest.mark.parametrize("policy", ["fish", "reverse"])
def test_fish_rows_are_the_reference_rows_of_the_loop_fisher(policy):
    model = M.mlp().double()
    batch = tuple(x.double() if x.is_floating_point() else x for x in M.mlp_batch(n=16))
    ref = gradsel.fisher_loop(model, batch, progress=False)
    sel = gradsel.select(model, batch, policy, keep=45, granularity="row", progress=False)
    expected = reference_rows({n: ref[n] for n in sel.candidates}, 45, largest=policy == "fish")
    assert all(torch.equal(sel.masks[n], expected[n]) for n in sel.candidates)


class _Transposed(nn.Module):
    """Weights whose output rows are their dim 1: GPT-2's Conv1D (square and not) and a ConvTranspose2d whose
    in and out channels agree (so a dim-0 row would pair with a bias entry by shape alone)."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.proj, self.up = Conv1D(6, 6), Conv1D(5, 6)  # Conv1D(out, in): weight (in, out)
        self.deconv = nn.ConvTranspose2d(5, 5, 3)
        self.grouped = nn.ConvTranspose2d(5, 5, 1, groups=5)  # groups: its output channels stay dim-0 rows
        self.head = nn.Linear(5 * 9, 3)

    def forward(self, x):
        h = self.up(torch.tanh(self.proj(x)))[:, :, None, None]
        return self.head(self.grouped(torch.tanh(self.deconv(h))).flatten(1))


_TRANSPOSED = ("proj.weight", "up.weight", "deconv.weight")


def _output_rows_first(tensors: dict) -> dict:
    return {n: t.movedim(1, 0) if n in _TRANSPOSED else t for n, t in tensors.items()}


@pytest.mark.parametrize("policy", ["fish", "reverse", "random"])
@pytest.mark.parametrize("keep", [0.3, 0.77])
def test_row_policies_take_the_output_rows_of_transposed_weights(policy, keep):
    torch.manual_seed(0)
    model = _Transposed().double()
    batch = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    sel = gradsel.select(model, batch, policy, keep=keep, granularity="row", progress=False)
    assert all(sel.masks[n].shape == p.shape for n, p in model.named_parameters())
    moved = _output_rows_first(sel.masks)
    whole, partial = _row_structure(moved, row_units({n: m.shape for n, m in moved.items()}))
    assert partial <= 1 and whole == sel.info["rows"]["whole_rows"]
    if policy != "random":
        ref = gradsel.fisher_loop(model, batch, progress=False)
        rows = reference_rows(_output_rows_first({n: ref[n] for n in sel.candidates}), sel.selected(),
                              largest=policy == "fish")
        expected = {n: m.movedim(0, 1) if n in _TRANSPOSED else m for n, m in rows.items()}
        assert all(torch.equal(sel.masks[n], expected[n]) for n in sel.candidates)


def test_per_tensor_rows_split_the_budget_over_weight_and_bias_units():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(n=16), "fish", keep=40, budget="per_tensor", granularity="row",
                         progress=False)
    assert sel.selected() == 40
    # units: (0.weight, 0.bias) 112 elements, (3.weight, 3.bias) 51: shares 27 and 13 (largest remainder)
    assert int(sel.masks["0.weight"].sum() + sel.masks["0.bias"].sum()) == 27
    assert int(sel.masks["3.weight"].sum() + sel.masks["3.bias"].sum()) == 13
    for unit in row_units(sel.shapes):
        assert _row_structure({n: sel.masks[n] for n in unit}, [unit])[1] <= 1


def test_random_rows_follow_the_seed():
    model = M.mlp()
    a, b, c = (gradsel.select(model, None, "random", keep=0.3, granularity="row", seed=s, progress=False)
               for s in (0, 1, 0))
    assert any(not torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


def test_row_rank_is_by_fisher_mass_on_a_precomputed_fisher():
    model = nn.Linear(3, 4)
    scores = {"weight": torch.tensor([[1., 1., 1.], [0., 0., 9.], [2., 2., 0.], [0., 0., 0.]]),
              "bias": torch.tensor([0., 0., 0., 5.])}
    sel = gradsel.select(model, None, "fish", keep=8, granularity="row", fisher=Fisher(scores, 4), progress=False)
    # masses 3, 9, 4, 5: rows 1 and 3 whole (8 elements)
    assert sel.masks["weight"].all(1).tolist() == [False, True, False, True]
    assert sel.masks["bias"].tolist() == [False, True, False, True]


def test_default_granularity_keeps_the_options_and_masks_of_before(tmp_path):
    model = M.mlp()
    batch = M.mlp_batch(n=16)
    assert gradsel.select(model, batch, "fish", keep=10, progress=False).options == {"budget": "global"}
    assert gradsel.select(model, batch, "random", keep=10, progress=False).options == {}
    plain = gradsel.select(model, batch, "fish", keep=10, progress=False)
    named = gradsel.select(model, batch, "fish", keep=10, granularity="element", progress=False)
    assert all(torch.equal(plain.masks[n], named.masks[n]) for n in plain.masks)
    rows = gradsel.select(model, batch, "fish", keep=10, granularity="row", progress=False)
    back = gradsel.Selection.load(rows.save(tmp_path / "rows.safetensors"), model)
    assert back.options == {"budget": "global", "granularity": "row"}
    assert back.policy_object().granularity == "row"


@pytest.mark.parametrize("policy", ["fish", "reverse", "random"])
def test_unknown_granularity_is_refused(policy):
    with pytest.raises(GradselError, match="granularity='col' is not known: use one of \\('element', 'row', 'head'\\)"):
        gradsel.select(M.mlp(), M.mlp_batch(), policy, keep=5, granularity="col", progress=False)


# -- head budgets (granularity="head") -----------------------------------------------------------------------

def _tiny_bert(heads: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=heads, intermediate_size=64)).eval()


class _GroupedQuery(nn.Module):
    """Grouped-query attention's projections as Llama names them: 4 query heads, 2 key/value heads of size 4."""

    def __init__(self):
        super().__init__()
        self.head_dim = 4
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 16), nn.Linear(8, 8, bias=False), nn.Linear(8, 8)
        self.o_proj = nn.Linear(16, 8)


def test_attention_heads_are_found_where_the_models_say_they_are():
    import timm

    from gradsel.policies.base import attention_heads

    bert = _tiny_bert()
    names = [n for n, _ in bert.named_parameters()]
    found = attention_heads(bert, names)
    expected = {f"bert.encoder.layer.{i}.attention.self.{p}.{a}" for i in range(2) for p in ("query", "key", "value")
                for a in ("weight", "bias")}
    assert found == dict.fromkeys(expected, 4)  # num_attention_heads / attention_head_size; not the output dense
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
    vit_found = attention_heads(vit, [n for n, _ in vit.named_parameters()])
    assert vit_found["blocks.0.attn.qkv.weight"] == vit_found["blocks.0.attn.qkv.bias"] == 9  # 3 heads × q, k, v
    assert "blocks.0.attn.proj.weight" not in vit_found
    mha = nn.MultiheadAttention(16, 4)
    assert attention_heads(mha, ["in_proj_weight", "in_proj_bias", "out_proj.weight"]) == {
        "in_proj_weight": 12, "in_proj_bias": 12}
    gqa = _GroupedQuery()
    assert attention_heads(gqa, [n for n, _ in gqa.named_parameters()]) == {
        "q_proj.weight": 4, "q_proj.bias": 4, "k_proj.weight": 2, "v_proj.weight": 2, "v_proj.bias": 2}
    # candidates only: a projection left out of the candidates is not reported
    assert attention_heads(bert, ["bert.encoder.layer.0.attention.self.query.weight"]) == {
        "bert.encoder.layer.0.attention.self.query.weight": 4}


def _head_blocks(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head block of ``mask`` (consecutive dim-0 rows): 1 all selected, 0 none, 0.5 partly."""
    counts = mask.reshape(heads, -1).sum(1)
    return torch.where(counts == 0, 0.0, torch.where(counts == mask.numel() // heads, 1.0, 0.5))


@pytest.mark.parametrize("policy", ["fish", "reverse", "random"])
@pytest.mark.parametrize("keep", [0.05, 0.3, 1000])
def test_head_policies_keep_exactly_k_in_whole_heads_and_rows_but_one(policy, keep):
    from gradsel.policies.base import attention_heads

    model = _tiny_bert()
    torch.manual_seed(1)
    scores = {n: torch.rand(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    sel = gradsel.select(model, None, policy, keep=keep, granularity="head", fisher=Fisher(scores, 4), progress=False)
    k = keep if isinstance(keep, int) else round(keep * sel.total())
    assert sel.selected() == k
    heads = attention_heads(model, sel.candidates)
    partial = 0
    for name, mask in sel.masks.items():
        if name in heads:  # a head's rows of a weight and its bias are taken together
            blocks = _head_blocks(mask, heads[name])
            partial += int((blocks == 0.5).sum()) if name.endswith("weight") else 0
            bias = name[:-len("weight")] + "bias"
            if name.endswith("weight") and bias in sel.masks:
                assert torch.equal(blocks > 0, _head_blocks(sel.masks[bias], heads[bias]) > 0)
        elif mask.dim() >= 2:
            rows = mask.reshape(mask.shape[0], -1).sum(1)
            partial += int(((rows > 0) & (rows < mask[0].numel())).sum())
    assert partial <= 1
    assert sel.options["granularity"] == "head"


def test_head_rank_is_by_the_fisher_mass_of_the_whole_head():
    model = _tiny_bert()
    scores = {n: torch.full(p.shape, 1e-3, dtype=torch.float64) for n, p in model.named_parameters()}
    query = "bert.encoder.layer.1.attention.self.query"
    # head 2 of layer 1's query (rows 16-23) has the largest mass as a head; no single row of it beats the
    # rows of the output dense, which a row ranking would take first
    scores[f"{query}.weight"][16:24] = 1.0
    scores["bert.encoder.layer.0.attention.output.dense.weight"][:8] = 2.0
    fisher = Fisher(scores, 4)
    head = gradsel.select(model, None, "fish", keep=8 * 33, granularity="head", fisher=fisher, progress=False)
    assert head.masks[f"{query}.weight"][16:24].all() and head.masks[f"{query}.bias"][16:24].all()
    assert head.selected() == int(head.masks[f"{query}.weight"].sum() + head.masks[f"{query}.bias"].sum())
    row = gradsel.select(model, None, "fish", keep=8 * 33, granularity="row", fisher=fisher, progress=False)
    assert row.masks["bert.encoder.layer.0.attention.output.dense.weight"][:8].all()
    assert not row.masks[f"{query}.weight"].any()


def test_head_granularity_on_a_model_without_heads_says_so():
    with pytest.raises(GradselError, match="granularity='head' found no attention heads"):
        gradsel.select(M.mlp(), M.mlp_batch(), "fish", keep=5, granularity="head", progress=False)


def test_nan_scores_are_refused_by_the_row_ranking():
    scores = {"weight": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    with pytest.raises(GradselError, match="scores contain NaN: the Fisher estimate is broken"):
        gradsel.select(nn.Linear(2, 2, bias=False), None, "fish", keep=2, granularity="row",
                       fisher=Fisher(scores, 1), progress=False)


# -- the row-sparse backward --------------------------------------------------------------------------------

def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _check_grads(model, dense, sparse, handle, masks):
    """Touched rows of row-sparse layers equal the dense gradient, the other rows are zero; all else equal."""
    layers = {f"{prefix}.weight" for prefix in handle.layers}
    assert layers, "no layer was made row-sparse"
    for name in dense:
        if dense[name] is None:  # not used by the forward (smp keeps encoder stages beyond encoder_depth)
            assert sparse[name] is None, name
        elif name in layers:
            touched = masks[name].reshape(masks[name].shape[0], -1).any(1)
            g = sparse[name]
            if not touched.any():
                assert g is None, name
                continue
            torch.testing.assert_close(g[touched], dense[name][touched], rtol=1e-12, atol=1e-14)
            assert bool((g[~touched] == 0).all()) and bool((dense[name][~touched] != 0).any()), name
        else:
            torch.testing.assert_close(sparse[name], dense[name], rtol=1e-12, atol=1e-14)


def test_mlp_grads_of_selected_rows_and_inputs_equal_the_dense_backward():
    model = M.mlp().double().eval()
    x, y = M.mlp_batch(n=16)
    x = x.double()
    sel = gradsel.select(model, (x, y), "fish", keep=0.3, budget="per_tensor", granularity="row", progress=False)

    def run():
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(model(inp), y).backward()
        return _grads(model), inp.grad

    dense, dense_x = run()
    with row_sparse(model, sel) as handle:
        sparse, sparse_x = run()
    assert set(handle.layers) == {"0", "3"}
    torch.testing.assert_close(sparse_x, dense_x, rtol=1e-12, atol=1e-14)
    _check_grads(model, dense, sparse, handle, sel.masks)


@pytest.mark.parametrize("threads", [1, 2])
def test_bert_grads_equal_the_dense_backward(threads):
    # on several threads the selected columns of the output gradient are taken with gather, not index_select
    model = M.bert().double().eval()
    batch = M.bert_batch()
    sel = gradsel.select(model, None, "random", keep=0.25, granularity="row", progress=False)

    def run():
        model.zero_grad()
        model(**batch).loss.backward()
        return _grads(model)

    dense = run()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with row_sparse(model, sel) as handle:
            sparse = run()
    finally:
        torch.set_num_threads(before)
    assert "bert.encoder.layer.0.attention.self.query" in handle.layers
    assert "bert.encoder.layer.1.output.dense" in handle.layers
    # embeddings and LayerNorms sit below / between the row-sparse layers: equal gradients there show that
    # the input gradient flows through every row-sparse Linear unchanged
    _check_grads(model, dense, sparse, handle, sel.masks)


def test_unet_conv_grads_equal_the_dense_backward():
    model = M.unet().double().train()
    x, y = M.unet_batch(n=2, size=32)
    x = x.double()
    sel = gradsel.select(model, None, "random", keep=0.25, granularity="row", progress=False)

    def run():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return _grads(model)

    dense = run()
    with row_sparse(model, sel) as handle:
        sparse = run()
    assert "encoder.conv1" in handle.layers and "segmentation_head.0" in handle.layers
    assert not handle.skipped
    _check_grads(model, dense, sparse, handle, sel.masks)


def _train(model, batches, sel, sparse, steps, use_sparse_adamw=False):
    if use_sparse_adamw:
        opt = sparse_adamw(sel, model, lr=1e-2, weight_decay=0.1)
        guard = None
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        guard = sel.apply(model, opt)
    rs = row_sparse(model, sel) if sparse else None
    assert rs is None or rs.layers
    for step in range(steps):
        opt.zero_grad()
        out = batches[step % len(batches)]
        loss = model(**out).loss if isinstance(out, dict) else nn.functional.cross_entropy(model(out[0]), out[1])
        loss.backward()
        opt.step()
    for h in (rs, guard):
        if h is not None:
            h.remove()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_sparse_adamw", [False, True], ids=["adamw+apply", "sparse_adamw"])
@pytest.mark.parametrize("case", ["mlp", "bert", "bert-heads"])
def test_training_row_sparse_equals_dense_masked_training(case, use_sparse_adamw):
    if case == "mlp":
        make = lambda: M.mlp().double().eval()  # noqa: E731
        batches = [tuple(t.double() if t.is_floating_point() else t for t in M.mlp_batch(n=16, seed=s))
                   for s in range(3)]
    else:
        make = lambda: M.bert().double().eval()  # noqa: E731
        batches = [M.bert_batch(seed=s) for s in range(3)]
    start = make()
    sel = gradsel.select(start, batches, "fish", keep=0.2, granularity="head" if case == "bert-heads" else "row",
                         progress=False)
    dense = _train(copy.deepcopy(start), batches, sel, False, 5, use_sparse_adamw)
    sparse = _train(copy.deepcopy(start), batches, sel, True, 5, use_sparse_adamw)
    moved = 0
    for n in dense:
        assert float((dense[n] - sparse[n]).abs().max()) <= 1e-10, n
        moved += int((dense[n] != start.get_parameter(n)).sum())
    assert moved == sel.selected()  # the selection trained, and nothing else


def test_remove_restores_the_plain_forward_and_leaves_the_model_as_it_was():
    model = M.mlp().double()
    keys = list(model.state_dict())
    sel = gradsel.select(model, None, "random", keep=0.3, granularity="row", progress=False)
    handle = row_sparse(model, sel)
    assert "forward" in model[0].__dict__ and type(model[0]) is nn.Linear and list(model.state_dict()) == keys
    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in model[0].__dict__ and list(model.state_dict()) == keys
    model(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    untouched = ~sel.masks["0.weight"].any(1)
    assert bool((model[0].weight.grad[untouched] != 0).all())  # dense again
    again = row_sparse(model, sel)  # can be made row-sparse again after remove
    assert again.layers
    again.remove()


def test_element_masks_leave_every_layer_dense():
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(n=16), "fish", keep=0.9, progress=False)
    assert all(bool(m.reshape(m.shape[0], -1).any(1).all()) for n, m in sel.masks.items() if n.endswith("weight"))
    with row_sparse(model, sel) as handle:
        assert handle.layers == {} and "forward" not in model[0].__dict__


def test_a_weight_without_selected_rows_gets_no_gradient_and_masks_are_reread():
    model = M.mlp().double().eval()
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["0.bias"][:4] = True
    masks["3.weight"][1] = True
    x = torch.randn(5, 6, dtype=torch.float64)
    dense = copy.deepcopy(model)
    dense(x).sum().backward()
    with row_sparse(model, masks) as handle:
        assert handle.layers == {"0": (0, 16), "3": (1, 3)}
        model(x).sum().backward()
        assert model[0].weight.grad is None
        torch.testing.assert_close(model[0].bias.grad, dense[0].bias.grad, rtol=1e-12, atol=0)
        assert bool((model[3].weight.grad[[0, 2]] == 0).all())
        masks["3.weight"][2, 0] = True  # changed in place, as a progressive policy may: read at the next forward
        model.zero_grad()
        model(x).sum().backward()
        torch.testing.assert_close(model[3].weight.grad[1:], dense[3].weight.grad[1:], rtol=1e-12, atol=0)
        assert bool((model[3].weight.grad[0] == 0).all())


def test_a_copy_of_a_row_sparse_model_trains_its_own_weights_densely():
    model = M.mlp().double()
    sel = gradsel.select(model, None, "random", keep=0.3, granularity="row", progress=False)
    with row_sparse(model, sel):
        twin = copy.deepcopy(model)
        twin(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
        assert model[0].weight.grad is None
        assert bool((twin[0].weight.grad != 0).all())


def test_grouped_convolutions_are_skipped_and_stay_exact():
    model = M.depthwise().double()
    sel = gradsel.select(model, None, "random", keep=0.3, granularity="row", progress=False)
    x, _ = M.image_batch(n=2, size=8)
    x = x.double()
    model(x).sum().backward()
    dense = _grads(model)
    model.zero_grad()
    with row_sparse(model, sel) as handle:
        model(x).sum().backward()
    assert handle.skipped == {"dw": "grouped convolution (groups=8)", "dw1d": "grouped convolution (groups=16)"}
    assert {"stem", "pw", "head"} <= set(handle.layers)
    _check_grads(model, dense, _grads(model), handle, sel.masks)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_bfloat16_matches_the_dense_autocast_backward(kind, compact):
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)), torch.randn(8, 16)
    else:
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 16, 4))
        x = torch.randn(2, 3, 4, 4)
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    masks["0.weight"][::3] = True

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        return model[0].weight.grad.clone()

    dense = run()
    with row_sparse(model, masks, compact=compact):
        sparse = run()
    assert sparse.dtype == torch.float32 and sparse.is_sparse == compact
    sparse = sparse.to_dense() if compact else sparse
    torch.testing.assert_close(sparse[::3], dense[::3], rtol=2e-2, atol=2e-2)
    assert bool((sparse[1::3] == 0).all())


def test_bad_inputs_are_refused():
    model = M.mlp()
    with pytest.raises(GradselError, match="needs a gradsel.Selection or a dict of bool masks, got list"):
        row_sparse(model, [1, 2])
    with pytest.raises(GradselError, match="the masks name \\['head.weight'\\], which Sequential does not have"):
        row_sparse(model, {"head.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(GradselError, match="the mask for '0.weight' has shape \\(2, 2\\), the parameter \\(16, 6\\)"):
        row_sparse(model, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(GradselError, match="the mask for '0.weight' is torch.float32, not bool"):
        row_sparse(model, {"0.weight": torch.ones(16, 6)})
    other = gradsel.select(nn.Sequential(nn.Linear(2, 2)), None, "random", keep=1, progress=False)
    with pytest.raises(GradselError, match="it was made for a different model"):
        row_sparse(model, other)
    masks = {"0.weight": torch.zeros(16, 6, dtype=torch.bool)}
    with row_sparse(model, masks):
        with pytest.raises(GradselError, match="layer '0' is row-sparse already"):
            row_sparse(model, masks)
    assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d(3, 6, 3, stride=2, padding=1, dilation=1), (2, 3, 9)),
                                        (nn.Conv2d(3, 6, 3, stride=1, padding=2, dilation=2), (3, 7, 7)),
                                        (nn.Conv3d(3, 6, 2, stride=1, padding=1, bias=False), (2, 3, 4, 4, 4))],
                         ids=["conv1d", "conv2d-unbatched-dilated", "conv3d"])
def test_convolutions_of_every_rank_match_the_dense_backward(conv, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv.double(), nn.Tanh()).eval()
    masks = {"0.weight": torch.zeros(conv.weight.shape, dtype=torch.bool)}
    masks["0.weight"][[1, 4]] = True
    x = torch.randn(shape, dtype=torch.float64)

    def run():
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        model(inp).square().sum().backward()
        return _grads(model), inp.grad

    (dense, dense_x) = run()
    with row_sparse(model, masks) as handle:
        sparse, sparse_x = run()
    assert handle.layers == {"0": (2, 6)}
    torch.testing.assert_close(sparse_x, dense_x, rtol=1e-12, atol=1e-14)
    _check_grads(model, dense, sparse, handle, masks)


def test_gradients_accumulate_over_backwards_as_dense_and_restart_after_set_to_none():
    model = M.bert().double().eval()
    batches = [M.bert_batch(seed=s) for s in range(2)]
    sel = gradsel.select(model, None, "random", keep=0.25, granularity="row", progress=False)

    def run():  # two backwards accumulate, then set_to_none and a third backward starts afresh
        model.zero_grad(set_to_none=True)
        for b in batches:
            model(**b).loss.backward()
        accumulated = _grads(model)
        model.zero_grad(set_to_none=True)
        model(**batches[1]).loss.backward()
        return accumulated, _grads(model)

    dense_acc, dense_one = run()
    with row_sparse(model, sel) as handle:
        sparse_acc, sparse_one = run()
    _check_grads(model, dense_acc, sparse_acc, handle, sel.masks)
    _check_grads(model, dense_one, sparse_one, handle, sel.masks)
    name = "bert.encoder.layer.0.attention.self.query.weight"  # the accumulation is not the last batch alone
    assert not torch.equal(sparse_acc[name], sparse_one[name])



# -- compact=True: the touched rows as a sparse gradient ---------------------------------------------------------

def _batches(case):
    if case == "bert":
        return M.bert().double().eval(), [M.bert_batch(seed=s) for s in range(3)]
    x, y = M.unet_batch(n=2, size=32)
    model = M.unet().double().eval()  # eval: BatchNorm's running statistics do not move between the runs
    return model, [(x.double() + s, y) for s in range(3)]


def _loss(model, batch):
    return model(**batch).loss if isinstance(batch, dict) else nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("case", ["bert", "unet"])
def test_compact_gradients_hold_the_touched_rows_of_the_dense_backward(case):
    model, batches = _batches(case)
    sel = gradsel.select(model, None, "random", keep=0.25, granularity="row", progress=False)

    def run(**kwargs):  # two backwards accumulate (the compact gradient's rows then repeat until coalesced)
        model.zero_grad(set_to_none=True)
        with row_sparse(model, sel, **kwargs) as handle:
            for b in batches[:2]:
                _loss(model, b).backward()
        return _grads(model), handle

    dense, _ = run()
    compact, handle = run(compact=True)
    assert handle.layers and not handle.skipped
    for name in dense:
        module = name.rsplit(".", 1)[0]
        if dense[name] is None:  # not used by the forward (smp keeps encoder stages beyond encoder_depth)
            assert compact[name] is None, name
        elif module in handle.layers and name.endswith("weight"):
            g, mask = compact[name], sel.masks[name]
            rows = mask.reshape(mask.shape[0], -1).any(1).nonzero().flatten()
            assert g.is_sparse and g.sparse_dim() == 1, name
            assert torch.equal(g.coalesce().indices()[0], rows), name
            torch.testing.assert_close(g.to_dense(), dense[name], rtol=1e-12, atol=1e-14)
        else:
            assert not compact[name].is_sparse, name
            torch.testing.assert_close(compact[name], dense[name], rtol=1e-12, atol=1e-14)


def _train_sparse_adamw(model, batches, sel, rows, compact_grads, backwards, steps=4, shrink=None):
    """SparseAdamW with ``backwards`` per step and clipping; ``rows``: None (dense backward), "dense" or
    "compact" (row_sparse); ``shrink``: (step, name, rows to drop) narrows the selection mid-run (set_mask)."""
    masks = {n: m.clone() for n, m in sel.masks.items()}
    opt = sparse_adamw(sel, model, lr=1e-2, weight_decay=0.1, compact_grads=compact_grads, progressive=True)
    handle = row_sparse(model, masks, compact=rows == "compact") if rows else None
    for step in range(steps):
        if shrink and step == shrink[0]:
            masks[shrink[1]][shrink[2]] = False
            opt.set_mask(model.get_parameter(shrink[1]), masks[shrink[1]])
        opt.zero_grad()
        for j in range(backwards):  # two: the compact gradient's rows repeat until coalesced
            _loss(model, batches[(step + j) % len(batches)]).backward()
        opt.clip_grad_norm_(0.5)
        opt.step()
    if handle is not None:
        handle.remove()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backwards", [1, 2])
@pytest.mark.parametrize("compact_grads", [False, True], ids=["grads", "compact_grads"])
@pytest.mark.parametrize("case", ["bert", "unet"])
def test_training_on_compact_row_gradients_equals_dense_training(case, compact_grads, backwards):
    start, batches = _batches(case)
    sel = gradsel.select(start, batches, "fish", keep=0.2, granularity="row", progress=False)
    name = next(n for n, m in sel.masks.items() if m.dim() > 1 and m.reshape(m.shape[0], -1).any(1).sum() > 1
                and not m.all())
    shrink = (2, name, sel.masks[name].reshape(sel.masks[name].shape[0], -1).any(1).nonzero().flatten()[:1])
    dense = _train_sparse_adamw(copy.deepcopy(start), batches, sel, None, compact_grads, backwards, shrink=shrink)
    compact = _train_sparse_adamw(copy.deepcopy(start), batches, sel, "compact", compact_grads, backwards,
                                  shrink=shrink)
    moved = 0
    for n in dense:
        assert float((dense[n] - compact[n]).abs().max()) <= 1e-10, n
        changed = dense[n] != start.get_parameter(n)
        assert not bool(changed[~sel.masks[n]].any()), n  # nothing outside the selection moved
        moved += int(changed.sum())
    assert moved > sel.selected() // 4  # and the selection trained


def test_compact_gradients_are_refused_where_they_cannot_be_read():
    model = M.mlp().double()
    x, y = M.mlp_batch(n=8)
    sel = gradsel.select(model, None, "random", keep=0.3, granularity="row", progress=False)
    guard = sel.apply(model, torch.optim.AdamW(model.parameters()))
    with row_sparse(model, sel, compact=True):
        with pytest.raises(GradselError, match="Selection.apply masks dense gradients and got a sparse one"):
            nn.functional.cross_entropy(model(x.double()), y).backward()
    guard.remove()
    model.zero_grad(set_to_none=True)
    opt = sparse_adamw(sel, model, lr=1e-2)
    fewer = {n: m.clone() for n, m in sel.masks.items()}
    w = fewer["0.weight"]
    w[w.reshape(w.shape[0], -1).any(1).nonzero().flatten()[0]] = False  # a row the optimizer trains, left out
    with row_sparse(model, fewer, compact=True):
        nn.functional.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(GradselError, match="lacks rows with selected elements: row_sparse and the optimizer"):
        opt.step()

    class DistributedDataParallel(nn.Module):  # what gradsel looks through by its class name
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(GradselError, match="sparse row gradients, which DDP's gradient reduction does not take"):
        row_sparse(DistributedDataParallel(model), sel, compact=True)
    row_sparse(DistributedDataParallel(model), sel).remove()  # compact=False is accepted there


# -- the conv weight gradient by kernel taps (few rows at many output positions) -----------------------------

@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 5), rows=st.integers(1, 4), height=st.integers(1, 9),
       width=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4), ph=st.integers(0, 3),
       pw=st.integers(0, 3), dh=st.integers(1, 3), dw=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_taps_weight_gradient_equals_the_convolution_backward(batch, channels, rows, height, width, kh, kw, ph, pw,
                                                              dh, dw, seed):
    ho, wo = height + 2 * ph - dh * (kh - 1), width + 2 * pw - dw * (kw - 1)
    assume(ho >= 1 and wo >= 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(rows, channels, kh, kw, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, rows, ho, wo, generator=g, dtype=torch.float64)
    dense = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [ph, pw], [dh, dw], False, [0, 0], 1,
                                                [False, True, False])[1]
    taps = _taps_weight_grad(x, grad, (kh, kw), (ph, pw), (dh, dw))
    assert taps.shape == dense.shape and taps.is_contiguous()
    torch.testing.assert_close(taps, dense, rtol=1e-12, atol=1e-12)


def test_few_rows_at_many_positions_take_the_taps_path_and_equal_the_dense_backward(monkeypatch):
    """A Unet-like high-resolution tail at 64x64 with 1-4 rows per layer: the shape rule sends the weight gradients
    of few rows against enough input channels and positions through the taps matmul; 4 rows of a 16-channel input
    (the shifted copies would outgrow the input), a stride-2 conv and a 1x1 conv (a plain matmul to oneDNN) stay on
    oneDNN; every gradient equals the dense backward."""
    import gradsel.rowsparse as rs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=2, dilation=2),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1),
                          nn.Conv2d(2, 64, 3, stride=2, padding=1), nn.Conv2d(64, 64, 1)).double()
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    for n, rows in {"0.weight": [3, 7], "2.weight": [0, 5, 9, 15], "4.weight": [1, 2, 8, 9], "5.weight": [1],
                    "6.weight": [2], "7.weight": [0, 1]}.items():
        masks[n][rows] = True
    x = torch.randn(2, 16, 64, 64, dtype=torch.float64)
    chosen = []
    real = rs._taps_weight_grad
    monkeypatch.setattr(rs, "_taps_weight_grad", lambda x, g, *a: chosen.append(tuple(g.shape)) or real(x, g, *a))

    def run():
        model.zero_grad()
        model(x).square().sum().backward()
        return _grads(model)

    dense = run()
    with row_sparse(model, masks) as handle:
        sparse = run()
    assert len(handle.layers) == 6
    assert sorted(chosen) == [(2, 1, 64, 64), (2, 2, 64, 64), (2, 4, 64, 64)]
    _check_grads(model, dense, sparse, handle, masks)
