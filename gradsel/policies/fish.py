"""fish: the top-k elements by Fisher information (FISH Mask, Sung et al. 2021; FISH-Tuning, Xue et al. 2025)."""

from __future__ import annotations

import torch

from ..errors import GradselError
from .base import Context, Policy, split_budget, top_k
from .registry import register_policy

BUDGETS = ("global", "per_tensor")


def ranked(ctx: Context, budget: str, largest: bool) -> dict[str, torch.Tensor]:
    """Top-k (or bottom-k) of the Fisher, over all candidates or within each tensor."""
    if budget not in BUDGETS:
        raise GradselError(f"budget={budget!r} is not known: use one of {BUDGETS}")
    scores = ctx.scores()
    if budget == "global":
        return top_k({n: scores[n] for n in ctx.candidates}, ctx.k, largest=largest)
    parts = split_budget([scores[n].numel() for n in ctx.candidates], ctx.k)
    masks = {}
    for name, k in zip(ctx.candidates, parts):
        masks.update(top_k({name: scores[name]}, k, largest=largest))
    return masks


@register_policy("fish")
class Fish(Policy):
    """Keep the ``k`` candidate elements with the largest Fisher information.

    Options:
        budget: ``"global"`` (one ranking over all candidates, the default, as FISH Mask) or
            ``"per_tensor"`` (each tensor keeps its share of ``k``).
    """

    def __init__(self, budget: str = "global"):
        super().__init__(budget=budget)
        self.budget = budget

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        return ranked(ctx, self.budget, largest=True)
