"""The catalogue of bad inputs: each raises a GradselError that names the batch key or argument, what was found
and what was expected, before any engine falls back to the slow loop (issue 14, point 3)."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError

from . import models as M

estimate = importlib.import_module("gradsel.fisher.estimate")


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts the samples that the batch-of-one loop engine is asked to run."""
    calls = []
    original = estimate._LoopEngine.__call__

    def counted(self, batch):
        calls.append(self.reader.size(batch))
        return original(self, batch)

    monkeypatch.setattr(estimate._LoopEngine, "__call__", counted)
    return calls


def _raises(fn, *patterns: str) -> GradselError:
    """``fn()`` raises a GradselError whose message matches every pattern, with no fallback warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(GradselError) as info:
            fn()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert not [w for w in caught if "falling back" in str(w.message)], [str(w.message) for w in caught]
    return info.value


def _seg_model():
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3, padding=1)  # logits (N, 4, H, W)


def _seg_batch(n=2, size=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n, size, size), generator=g)


def _with(y_of):
    """An MLP batch (12 samples, 3 classes) with its targets replaced by ``y_of(targets)``."""
    def make():
        x, y = M.mlp_batch()
        return x, y_of(y)
    return make


def _set(y, i, value):
    y = y.clone()
    y[i] = value
    return y


# id: (model, batch, fisher options, patterns the message must match)
CASES = {
    "float_targets": (M.mlp, _with(lambda y: y.float()), {},
                      [r"batch\[1\] \(the targets\)", r"torch\.float32", r"shape \(12,\)", r"torch\.int64"]),
    "column_targets_n_by_1": (M.mlp, _with(lambda y: y[:, None]), {},
                              [r"batch\[1\] \(the targets\) has shape \(12, 1\)", r"logits of shape \(12, 3\)",
                               r"expects class indices of shape \(12,\)", r"reshape\(12\)"]),
    "class_index_too_large": (M.mlp, _with(lambda y: _set(y, 7, 5)), {},
                              [r"batch\[1\] \(the targets\)", r"class index 5 \(sample 7\)", r"3 classes",
                               r"\[0, 2\]", r"-100"]),
    "class_index_negative": (M.mlp, _with(lambda y: _set(y, 2, -1)), {},
                             [r"batch\[1\] \(the targets\)", r"class index -1 \(sample 2\)", r"\[0, 2\]"]),
    "targets_too_short": (M.mlp, _with(lambda y: y[:5]), {},
                          [r"batch\[1\] \(the targets\) has shape \(5,\)", r"batch\[0\] hold 12 samples",
                           r"shape \(12,\)"]),
    # a single label was silently treated as an unbatched constant and broadcast to every sample
    "targets_of_length_one": (M.mlp, _with(lambda y: y[:1]), {},
                              [r"batch\[1\] \(the targets\) has shape \(1,\)", r"hold 12 samples"]),
    "targets_0d": (M.mlp, _with(lambda y: y[0]), {}, [r"batch\[1\] \(the targets\) has shape \(\)", r"12 samples"]),
    "targets_int32": (M.mlp, _with(lambda y: y.int()), {},
                      [r"batch\[1\] \(the targets\) has dtype torch\.int32", r"torch\.int64", r"\.long\(\)"]),
    # F.cross_entropy takes uint8 but vmap's gather does not; vmap takes int32 but F.cross_entropy does not
    "targets_uint8": (M.mlp, _with(lambda y: y.to(torch.uint8)), {},
                      [r"batch\[1\] \(the targets\) has dtype torch\.uint8", r"torch\.int64"]),
    "targets_bool": (M.mlp, _with(lambda y: y > 0), {}, [r"batch\[1\] \(the targets\) has dtype torch\.bool"]),
    "targets_a_list": (M.mlp, _with(lambda y: y.tolist()), {},
                       [r"batch\[1\] \(the targets\) is a list", r"shape \(12,\)"]),
    "no_targets_with_forward": (M.mlp, lambda: (M.mlp_batch()[0],), {"forward": lambda m, b: m(b[0])},
                                [r"batch\[1\]", r"1 element", r"loss="]),
    "seg_targets_wrong_size": (_seg_model, lambda: (_seg_batch()[0], torch.zeros(2, 9, 8, dtype=torch.long)), {},
                               [r"batch\[1\] \(the targets\) has shape \(2, 9, 8\)",
                                r"logits of shape \(2, 4, 8, 8\)", r"shape \(2, 8, 8\)"]),
    "seg_targets_per_image": (_seg_model, lambda: (_seg_batch()[0], torch.zeros(2, dtype=torch.long)), {},
                              [r"batch\[1\] \(the targets\) has shape \(2,\)", r"shape \(2, 8, 8\)"]),
    "seg_targets_float_mask": (_seg_model, lambda: (_seg_batch()[0], _seg_batch()[1].float()), {},
                               [r"batch\[1\] \(the targets\) has dtype torch\.float32 and shape \(2, 8, 8\)",
                                r"integer class indices \(torch\.int64\) of shape \(2, 8, 8\)"]),
    "seg_class_index_too_large": (_seg_model, lambda: (_seg_batch()[0], _set(_seg_batch()[1], (1, 3, 2), 4)), {},
                                  [r"class index 4 \(sample 1\)", r"4 classes", r"\[0, 3\]"]),
    "one_class_head": (lambda: nn.Linear(6, 1), _with(lambda y: torch.zeros_like(y)), {},
                       [r"single class", r"shape \(12, 1\)", r"binary_cross_entropy_with_logits"]),
    "one_dim_logits": (lambda: nn.Sequential(nn.Linear(6, 1), nn.Flatten(0)), _with(lambda y: y), {},
                       [r"output for one sample has shape \(1,\)", r"\(N, C\)", r"loss="]),
    "hf_labels_too_short": (M.bert, lambda: {**M.bert_batch(), "labels": M.bert_batch()["labels"][:4]}, {},
                            [r"batch\['labels'\] has shape \(4,\)", r"batch\['input_ids'\] holds 6 samples",
                             r"shape \(6, \.\.\.\)"]),
    # labels first in the dict: the batch size still comes from input_ids
    "hf_labels_first_too_long": (M.bert, lambda: {"labels": torch.zeros(9, dtype=torch.long),
                                                  **{k: v for k, v in M.bert_batch().items() if k != "labels"}}, {},
                                 [r"batch\['labels'\] has shape \(9,\)", r"batch\['input_ids'\] holds 6 samples"]),
    "hf_labels_out_of_range": (M.bert, lambda: {**M.bert_batch(), "labels": _set(M.bert_batch()["labels"], 3, 7)},
                               {}, [r"batch\['labels'\] holds class index 7 \(sample 3\)", r"2 classes",
                                    r"\[0, 1\]"]),
    "hf_attention_mask_too_short": (M.bert, lambda: {**M.bert_batch(),
                                                     "attention_mask": M.bert_batch()["attention_mask"][:2]}, {},
                                    [r"batch\['attention_mask'\] has shape \(2, 10\)", r"holds 6 samples"]),
    # the wrong length is found where the data is read, also when samples= packs rows into new batches
    "targets_too_short_with_samples": (M.mlp, lambda: [M.mlp_batch(), _with(lambda y: y[:4])()],
                                       {"samples": [0, 13]}, [r"batch\[1\] \(the targets\) has shape \(4,\)"]),
    # kind="mc" replaces the labels' values but not their shape
    "mc_column_targets": (M.mlp, _with(lambda y: y[:, None]), {"kind": "mc"},
                          [r"batch\[1\] \(the targets\) has shape \(12, 1\)", r"shape \(12,\)"]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_bad_data_is_named_before_any_engine_runs(case, engine, loop_calls):
    make_model, make_batch, options, patterns = CASES[case]
    model = make_model()
    _raises(lambda: gradsel.fisher(model, make_batch(), progress=False, engine=engine, **options), *patterns)
    assert loop_calls == []  # the slow loop never ran


def test_model_code_that_fails_alone_too_is_raised_not_fallen_back_from(loop_calls):
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            # data-dependent: vmap cannot run it, and a batch holding a large sample fails on every engine
            if bool((x[:, 0] > 1.5).any()):
                raise RuntimeError("this sample is too large")
            return self.lin(x)

    model = nn.Sequential(Picky())
    x, y = M.mlp_batch()
    x[:, 0] = x[:, 0].clamp(max=1.0)
    bad = 5
    x[bad, 0] = 2.0
    error = _raises(lambda: gradsel.fisher(model, (x, y), progress=False),
                    rf"Picky \(module '0'\) raised on sample {bad} alone", r"not a limitation of vmap",
                    r"RuntimeError: this sample is too large")
    assert isinstance(error.__cause__, RuntimeError)
    assert sum(loop_calls) == len(y) + bad + 1  # the chunk failed, then samples 0..5 alone: it stopped at 5


def test_a_failing_loss_is_named_as_the_loss():
    def loss(outputs, batch):
        return nn.functional.cross_entropy(outputs, batch[1]) * batch[2]  # there is no batch[2]

    x, y = M.mlp_batch()
    error = _raises(lambda: gradsel.fisher(M.mlp(), (x, y), loss=loss, progress=False),
                    r"^loss= raised on sample 0 alone", r"IndexError")
    assert isinstance(error.__cause__, IndexError)


# -- valid inputs that the checks must let through, each against the loop in float64 --------------------

def _close_to_loop(model, batch, **kw):
    est = gradsel.fisher(model, batch, progress=False, **kw)
    ref = gradsel.fisher_loop(model, batch, progress=False, **kw)
    assert est.engine == "vmap"
    for name in ref:
        torch.testing.assert_close(est[name], ref[name])
    return est


def test_ignore_index_is_allowed_and_ignored():
    model = M.mlp().double()
    x, y = M.mlp_batch()
    y[4] = -100
    est = _close_to_loop(model, (x.double(), y), per_sample=True)
    assert est.per_sample[4] == 0 and bool((est.per_sample[torch.arange(12) != 4] > 0).all())
    xs, ys = _seg_batch()
    ys[0, :3] = -100
    _close_to_loop(_seg_model().double(), (xs.double(), ys))


def test_class_probabilities_of_the_logits_shape_are_allowed():
    model = M.mlp().double()
    x, y = M.mlp_batch()
    x = x.double()
    soft = _close_to_loop(model, (x, nn.functional.one_hot(y, 3).double()))
    hard = gradsel.fisher(model, (x, y), progress=False)
    for name in hard:  # one-hot probabilities give the Fisher of the class indices
        torch.testing.assert_close(soft[name], hard[name])


def test_a_custom_loss_gets_no_cross_entropy_checks():
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)  # batch[1]: a constant, not one per sample
    model = M.mlp().double()
    x, y = M.mlp_batch()

    def loss(outputs, batch):
        return (outputs.square() * batch[1]).sum()

    est = _close_to_loop(model, (x.double(), weights), loss=loss)
    assert all(bool((t > 0).any()) for t in est.values())


def test_a_dict_model_without_logits_keeps_its_own_loss():
    class DictModel(nn.Module):  # takes the HF keywords, returns only a loss
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None, labels=None):
            h = self.head(self.embed(input_ids).mean(1))
            return {"loss": nn.functional.cross_entropy(h, labels)} if labels is not None else {"hidden": h}

    torch.manual_seed(0)
    batch = M.bert_batch()
    batch["labels"][2] = 5  # not a class index the range check can see: no logits in the output
    model = DictModel().double()
    with pytest.raises(GradselError, match=r"DictModel \(the model itself\) raised on sample 2 alone.*IndexError"):
        gradsel.fisher(model, batch, progress=False)
    batch["labels"][2] = 1
    _close_to_loop(model, batch)
