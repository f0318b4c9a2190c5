"""The result of a Fisher estimate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch


class Fisher(Mapping):
    """Diagonal Fisher estimate: parameter name → tensor of the parameter's shape.

    Each entry is the mean over ``num_samples`` samples of the squared per-sample gradient.

    Attributes:
        num_samples: how many samples went into the mean.
        kind: ``"empirical"`` (dataset labels) or ``"mc"`` (labels drawn from the model).
        per_sample: optional ``(num_samples,)`` tensor, each sample's ``Σ_j g_ij²`` over the requested
            parameter subset (``None`` unless asked for).
        sample_index: optional ``(num_samples,)`` tensor, the position in the data of each sample used.
        engine: ``"vmap"`` or ``"loop"``: which engine produced it.
    """

    def __init__(self, scores: dict[str, torch.Tensor], num_samples: int, kind: str = "empirical",
                 per_sample: torch.Tensor | None = None, sample_index: torch.Tensor | None = None,
                 engine: str = "vmap"):
        self._scores = scores
        self.num_samples = num_samples
        self.kind = kind
        self.per_sample = per_sample
        self.sample_index = sample_index
        self.engine = engine

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def numel(self) -> int:
        """Number of scored elements."""
        return sum(t.numel() for t in self._scores.values())

    def flat(self) -> torch.Tensor:
        """All scores concatenated in name order (float32 or float64)."""
        return torch.cat([t.reshape(-1) for t in self._scores.values()])

    def __repr__(self) -> str:
        return (f"Fisher({len(self)} tensors, {self.numel():,} elements, num_samples={self.num_samples}, "
                f"kind={self.kind!r}, engine={self.engine!r})")
