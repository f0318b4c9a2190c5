"""The reference ranking that ``gradsel.policies.top_k`` must match: a stable sort of the scores."""

from __future__ import annotations

import torch


def stable_top_k(scores: dict[str, torch.Tensor], k: int, *, largest: bool = True,
                 within: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The flat mask (all tensors in dict order) of the ``k`` best scores by a stable sort.

    Sorting (score, position) stably, with position = parameter order then flat index, is the tie rule
    top_k promises: among equal scores the earlier position wins. Entries outside ``within`` never compete.
    """
    flat = torch.cat([t.reshape(-1).double() for t in scores.values()])
    inside = (torch.ones(len(flat), dtype=torch.bool) if within is None
              else torch.cat([within[n].reshape(-1) for n in scores]))
    positions = inside.nonzero().flatten()
    order = torch.sort(flat[positions], descending=largest, stable=True).indices
    expected = torch.zeros(len(flat), dtype=torch.bool)
    expected[positions[order[:k]]] = True
    return expected
