"""The torch.func Fisher estimator against the batch-of-one reference loop, in float64."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError

from . import models as M


def _double(batch):
    if isinstance(batch, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return tuple(x.double() if x.is_floating_point() else x for x in batch)


ARCHS = {
    "mlp": (M.mlp, M.mlp_batch),
    "cnn_batchnorm": (M.cnn, M.cnn_batch),
    "embedding_attention_layernorm": (M.attention, M.attention_batch),
    "bert": (M.bert, M.bert_batch),
    "bert_lora": (M.bert_lora, M.bert_batch),
    "smp_unet": (M.unet, M.unet_batch),
}


def _reference(model, batch, **kw):
    """Batch-of-one loop written out here, independent of the library's engines."""
    names = kw.pop("names")
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    n = len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])
    was = model.training
    model.eval()
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()} if isinstance(batch, dict) else tuple(x[i:i + 1] for x in batch)
        if isinstance(one, dict):
            loss = model(**one).loss
        else:
            out = model(one[0])
            loss = nn.functional.cross_entropy(out, one[1])
        grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                total[k] += g.detach() ** 2
    model.train(was)
    return {k: v / n for k, v in total.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_vmap_matches_batch_of_one_loop_float64(arch):
    make, make_batch = ARCHS[arch]
    model = make().double()
    batch = _double(make_batch())
    est = gradsel.fisher(model, batch, chunk_size=3, progress=False, engine="vmap")
    assert est.engine == "vmap"
    names = gradsel.params.resolve(model)
    ref = _reference(model, batch, names=names)
    assert list(est) == names
    largest = max(r.abs().max().item() for r in ref.values())
    assert largest > 0
    for name in names:
        assert est[name].dtype == torch.float64 and est[name].shape == ref[name].shape
        diff = (est[name] - ref[name]).abs().max().item()
        assert diff <= 1e-8 * largest, (name, diff, largest)
    # the library's own loop engine agrees as well
    loop = gradsel.fisher_loop(model, batch, progress=False)
    assert loop.engine == "loop"
    for name in names:
        torch.testing.assert_close(loop[name], est[name], rtol=1e-9, atol=1e-12 * largest)


def test_peft_default_candidates_are_adapter_parameters():
    model = M.bert_lora()
    est = gradsel.fisher(model, M.bert_batch(), progress=False)
    assert est and all("lora_A" in n or "lora_B" in n for n in est)
    assert not any("classifier" in n for n in est)


@pytest.mark.parametrize("encoder", [False, True], ids=["prompt_tuning", "p_tuning"])
def test_peft_prompt_learning_default_candidates_are_the_prompt_encoders(encoder):
    # prompt learning has no tuner prefix: the candidates had been none ("no candidate parameters are left")
    model = M.bert_prompt(encoder=encoder)
    est = gradsel.fisher(model, M.bert_batch(), progress=False)
    assert sorted(est) == sorted(n for n, p in model.named_parameters() if n.startswith("prompt_encoder."))
    assert len(est) == (7 if encoder else 1) and all(est[n].any() for n in est)


def test_chunked_equals_unchunked_and_batches_equal_one_batch():
    model = M.cnn().double()
    x, y = _double(M.cnn_batch(n=10))
    whole = gradsel.fisher(model, (x, y), chunk_size=10, progress=False)
    chunked = gradsel.fisher(model, (x, y), chunk_size=3, progress=False)
    loader = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 10, 4)]
    split = gradsel.fisher(model, loader, chunk_size=2, progress=False)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(split[name], whole[name], rtol=1e-12, atol=1e-15)
    assert whole.num_samples == chunked.num_samples == split.num_samples == 10


def test_num_samples_stops_early_exactly():
    model = M.mlp().double()
    x, y = _double(M.mlp_batch(n=20))
    loader = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 20, 6)]
    est = gradsel.fisher(model, loader, num_samples=7, progress=False)
    first7 = gradsel.fisher_loop(model, (x[:7], y[:7]), progress=False)
    assert est.num_samples == 7
    assert est.sample_index.tolist() == list(range(7))
    for name in est:
        torch.testing.assert_close(est[name], first7[name])
    with pytest.warns(UserWarning, match="held only 20"):
        assert gradsel.fisher(model, loader, num_samples=50, progress=False).num_samples == 20


def test_model_state_is_left_as_it_was():
    model = M.cnn()
    model.train()
    model.bn2.eval()  # a mixed state must come back mixed
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    gradsel.fisher(model, M.cnn_batch(), progress=False)
    assert model.training and model.bn1.training and not model.bn2.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k  # parameters and running statistics
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_runs_in_eval_mode_dropout_off():
    model = M.mlp().double()  # has Dropout(0.3)
    batch = _double(M.mlp_batch())
    model.train()
    a = gradsel.fisher(model, batch, progress=False)
    b = gradsel.fisher(model, batch, progress=False)
    for name in a:
        assert torch.equal(a[name], b[name])


def test_mc_kind_estimates_the_true_fisher_of_a_softmax_model():
    # For logits W x, the expected squared gradient over y ~ p is p_c (1 - p_c) x_j^2 (closed form).
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    n = 20000
    batch = (x.expand(n, 3).contiguous(), torch.zeros(n, dtype=torch.long))
    est = gradsel.fisher(model, batch, kind="mc", chunk_size=5000, progress=False, seed=3)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)[0]
    truth = (p * (1 - p))[:, None] * x[0] ** 2
    torch.testing.assert_close(est["weight"], truth, rtol=0.05, atol=0)
    # the empirical Fisher with the fixed label 0 is a different quantity
    emp = gradsel.fisher(model, batch, progress=False)
    assert not torch.allclose(emp["weight"], truth, rtol=0.2)
    # both engines draw the same labels for the same seed
    small = (batch[0][:8], batch[1][:8])
    a = gradsel.fisher(model, small, kind="mc", seed=1, progress=False)
    b = gradsel.fisher_loop(model, small, kind="mc", seed=1, progress=False)
    torch.testing.assert_close(a["weight"], b["weight"])


def test_mc_labels_belong_to_the_sample_not_to_the_batching():
    # each sample's label draws are seeded by its position: batching, chunking and subsets cannot change them
    model = M.mlp().double()
    x, y = _double(M.mlp_batch(n=12))
    split = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)]
    whole = gradsel.fisher(model, (x, y), kind="mc", seed=3, per_sample=True, progress=False)
    parts = gradsel.fisher(model, split, kind="mc", seed=3, per_sample=True, chunk_size=2, progress=False)
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name])
    torch.testing.assert_close(parts.per_sample, whole.per_sample)
    pick = torch.tensor([2, 7, 11])
    sub = gradsel.fisher(model, split, samples=pick, kind="mc", seed=3, per_sample=True, progress=False)
    torch.testing.assert_close(sub.per_sample, whole.per_sample[pick])
    ref = gradsel.fisher_loop(model, split, samples=pick, kind="mc", seed=3, progress=False)
    for name in sub:
        torch.testing.assert_close(sub[name], ref[name])
    other = gradsel.fisher(model, (x, y), kind="mc", seed=4, per_sample=True, progress=False)
    assert not torch.allclose(other.per_sample, whole.per_sample)


def test_per_sample_contributions_over_a_subset():
    model = M.mlp().double()
    batch = _double(M.mlp_batch(n=9))
    names = list(dict(model.named_parameters()))
    mask = {names[0]: torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5,
            names[3]: None}
    est = gradsel.fisher(model, batch, per_sample=mask, chunk_size=4, progress=False)
    params = dict(model.named_parameters())
    expected = []
    for i in range(9):
        loss = nn.functional.cross_entropy(model.eval()(batch[0][i:i + 1]), batch[1][i:i + 1])
        g0, g3 = torch.autograd.grad(loss, [params[names[0]], params[names[3]]])
        expected.append((g0[mask[names[0]]] ** 2).sum() + (g3 ** 2).sum())
    torch.testing.assert_close(est.per_sample, torch.stack(expected).detach())
    whole = gradsel.fisher(model, batch, per_sample=True, progress=False)
    torch.testing.assert_close(whole.per_sample.sum() / 9, whole.flat().sum())


def test_samples_subset_uses_only_those_samples():
    model = M.mlp().double()
    x, y = _double(M.mlp_batch(n=12))
    loader = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)]
    pick = torch.tensor([1, 4, 5, 11])
    est = gradsel.fisher(model, loader, samples=pick, progress=False)
    ref = gradsel.fisher_loop(model, (x[pick], y[pick]), progress=False)
    assert est.num_samples == 4 and est.sample_index.tolist() == pick.tolist()
    for name in est:
        torch.testing.assert_close(est[name], ref[name])

    class Counting:  # counts the batches the estimator asks for
        def __init__(self):
            self.read = 0

        def __iter__(self):
            for b in loader:
                self.read += 1
                yield b

    early = Counting()
    est = gradsel.fisher(model, early, samples=[1, 4], progress=False)
    assert early.read == 1 and est.sample_index.tolist() == [1, 4]  # stops after the batch holding position 4
    with pytest.raises(GradselError, match="position 12, but the data held only 12 samples"):
        gradsel.fisher(model, loader, samples=[3, 12], progress=False)


def test_samples_are_read_packed_into_full_batches():
    # what IRD's late rounds rely on: 6 samples spread over 4 batches cost one vmap call, not four
    from gradsel.fisher.batches import BatchReader, gather

    reader = BatchReader()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    wanted = torch.tensor([1, 5, 17, 18, 40, 63])
    batches = list(gather(data, wanted, reader))
    assert len(batches) == 1 and torch.equal(batches[0][0], wanted) and torch.equal(batches[0][1][0], x[wanted])
    assert [len(p) for p, _ in gather(data, torch.arange(0, 64, 2), reader)] == [16, 16]
    assert [len(p) for p, _ in gather(data, torch.arange(0, 64, 2), reader, 5)] == [8, 8, 8, 8]
    # HF batches padded to other lengths cannot be joined: each keeps its own
    hf = [M.bert_batch(n=4, t=t, seed=t) for t in (6, 6, 9)]
    got = list(gather(hf, torch.tensor([0, 5, 6, 9]), reader))
    assert [p.tolist() for p, _ in got] == [[0, 5, 6], [9]]
    assert [tuple(b["input_ids"].shape) for _, b in got] == [(3, 6), (1, 9)]
    assert torch.equal(got[1][1]["input_ids"][0], hf[2]["input_ids"][1])


def test_params_selects_candidates_by_glob_class_and_callable():
    model = M.cnn()
    batch = M.cnn_batch()
    assert list(gradsel.fisher(model, batch, params="conv*.weight", progress=False)) == ["conv1.weight", "conv2.weight"]
    assert list(gradsel.fisher(model, batch, params=nn.BatchNorm2d, progress=False)) == [
        "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]
    assert list(gradsel.fisher(model, batch, params=lambda n, p: p.dim() == 1 and n.startswith("head"),
                               progress=False)) == ["head.bias"]


class _ItemGate(nn.Module):
    """Data-dependent control flow (``.item()``): vmap cannot run it."""

    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("case", ["item_in_a_submodule", "rnn"])
def test_fallback_to_loop_warns_and_agrees(case):
    torch.manual_seed(0)
    if case == "rnn":  # torch's RNN kernels have no vmap rule in float64
        model, x, culprit = _Recurrent().double(), torch.randn(6, 3, 4, dtype=torch.float64), "RNN (module 'rnn')"
    else:
        model = nn.Sequential(nn.Linear(4, 3), _ItemGate()).double()
        x, culprit = torch.randn(6, 4, dtype=torch.float64), "_ItemGate (module '1')"
    batch = (x, torch.randint(0, 2, (6,)))
    with pytest.warns(RuntimeWarning, match="falling back to the batch-of-one loop") as caught:
        est = gradsel.fisher(model, batch, progress=False)
    message = str(caught[0].message)
    assert f"vmap cannot run {culprit} " in message  # the innermost module that raised, not the model's class
    assert "engine='hooks'" in message  # the faster way out
    assert est.engine == "loop"
    ref = _reference(model, batch, names=[n for n, _ in model.named_parameters()])
    for name in ref:
        torch.testing.assert_close(est[name], ref[name])


def test_custom_forward_and_loss():
    model = M.mlp().double()
    x, y = _double(M.mlp_batch())
    batch = {"features": x, "target": y, "note": "ignored string"}
    est = gradsel.fisher(model, batch, forward=lambda m, b: m(b["features"]),
                         loss=lambda out, b: nn.functional.cross_entropy(out, b["target"]), progress=False)
    ref = gradsel.fisher_loop(model, (x, y), progress=False)
    for name in ref:
        torch.testing.assert_close(est[name], ref[name])


def test_bfloat16_model_accumulates_in_float32():
    model = M.mlp().to(torch.bfloat16)
    x, y = M.mlp_batch()
    est = gradsel.fisher(model, (x.bfloat16(), y), progress=False)
    assert all(t.dtype == torch.float32 for t in est.values())


def test_progress_bar_shows_and_can_be_silenced(capsys):
    model, batch = M.mlp(), M.mlp_batch()
    gradsel.fisher(model, batch, progress=False)
    assert "fisher" not in capsys.readouterr().err
    gradsel.fisher(model, batch, progress=True)
    assert "fisher" in capsys.readouterr().err


# -- errors ---------------------------------------------------------------------------------------------

def test_error_unreadable_batch():
    with pytest.raises(GradselError, match="bare tensor"):
        gradsel.fisher(M.mlp(), torch.randn(4, 6), progress=False)
    with pytest.raises(GradselError, match=r"needs \(inputs, targets\)"):
        gradsel.fisher(M.mlp(), [(torch.randn(4, 6),)], progress=False)
    with pytest.raises(GradselError, match="cannot read a batch of type"):
        gradsel.fisher(M.mlp(), [object()], progress=False)


def test_error_model_without_loss():
    batch = M.bert_batch()
    batch.pop("labels")
    with pytest.raises(GradselError, match="returned no loss.*labels"):
        gradsel.fisher(M.bert(), batch, progress=False)


def test_error_params_match_nothing():
    with pytest.raises(GradselError, match="'decoder.*' matches no parameter.*0.weight"):
        gradsel.fisher(M.mlp(), M.mlp_batch(), params="decoder.*", progress=False)


def test_error_nan_gradient_names_parameter_and_sample():
    x, y = M.mlp_batch(n=8)
    x[5, 2] = float("nan")
    with pytest.raises(GradselError, match=r"'0.weight' for sample 5 is NaN or Inf"):
        gradsel.fisher(M.mlp(), [(x[:4], y[:4]), (x[4:], y[4:])], chunk_size=2, progress=False)


def test_error_empty_data_and_bad_options():
    with pytest.raises(GradselError, match="no samples were read"):
        gradsel.fisher(M.mlp(), [], progress=False)
    with pytest.raises(GradselError, match="kind="):
        gradsel.fisher(M.mlp(), M.mlp_batch(), kind="true", progress=False)
    with pytest.raises(GradselError, match="num_samples"):
        gradsel.fisher(M.mlp(), M.mlp_batch(), num_samples=0, progress=False)


def test_embedding_rows_path_matches_loop_with_padding_and_contributions():
    # word embeddings take the row-sparse path; padded positions use padding_idx 0 (no gradient)
    model = M.bert().double()
    batch = M.bert_batch(n=7)
    assert (batch["input_ids"] == 0).any()
    name = "bert.embeddings.word_embeddings.weight"
    mask = {name: torch.rand(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(0)) > 0.3,
            "classifier.weight": None}
    est = gradsel.fisher(model, batch, per_sample=mask, chunk_size=3, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    torch.testing.assert_close(est[name], ref[name], rtol=1e-9, atol=1e-15)
    assert est[name][0].abs().sum() == 0  # padding row
    torch.testing.assert_close(est.per_sample, ref.per_sample, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "bert"])
def test_contributions_alone_match_the_loop_on_every_rule(arch):
    # scores=False skips the Fisher sums; the contributions must be those the loop gives with the Fisher
    # (dense vmap gradients on the MLP, the conv rule on the CNN, the embedding rule on BERT)
    gen = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model, batch = M.mlp().double(), _double(M.mlp_batch(n=7))
    elif arch == "cnn":
        model, batch = M.cnn().double(), _double(M.cnn_batch(n=7))
    else:
        model, batch = M.bert().double(), M.bert_batch(n=7)
    params = dict(model.named_parameters())
    names = list(params)
    mask = {names[0]: torch.rand(params[names[0]].shape, generator=gen) > 0.5, names[-1]: None}
    est = gradsel.fisher(model, batch, per_sample=mask, scores=False, chunk_size=3, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    assert len(est) == 0 and est.num_samples == 7
    torch.testing.assert_close(est.per_sample, ref.per_sample, rtol=1e-9, atol=1e-15)
    expected = ref.num_samples * ((ref[names[0]] * mask[names[0]]).sum() + ref[names[-1]].sum())
    torch.testing.assert_close(est.per_sample.sum(), expected, rtol=1e-9, atol=0)
    with pytest.raises(GradselError, match="scores=False.*per_sample="):
        gradsel.fisher(model, batch, scores=False, progress=False)


def test_nan_found_when_only_contributions_are_computed():
    x, y = M.cnn_batch(n=6)
    x[4, 1, 2, 2] = float("inf")
    with pytest.raises(GradselError, match=r"'conv1.weight' for sample 4 is NaN or Inf"):
        gradsel.fisher(M.cnn(), (x, y), params="conv1.weight", per_sample=True, scores=False, chunk_size=3,
                       progress=False)


def test_nan_in_a_convolution_input_is_found_through_the_conv_rule():
    x, y = M.cnn_batch(n=6)
    x[4, 1, 2, 2] = float("inf")
    with pytest.raises(GradselError, match=r"for sample 4 is NaN or Inf"):
        gradsel.fisher(M.cnn(), (x, y), params="conv1.weight", chunk_size=3, progress=False)
