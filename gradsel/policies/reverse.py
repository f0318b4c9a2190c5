"""reverse: the control that keeps the lowest-Fisher elements at the same budget."""

from __future__ import annotations

import torch

from .base import Context, Policy
from .fish import ranked
from .registry import register_policy


@register_policy("reverse")
class Reverse(Policy):
    """Keep the ``k`` candidate elements with the *smallest* Fisher information (a control for ``fish``)."""

    def __init__(self, budget: str = "global"):
        super().__init__(budget=budget)
        self.budget = budget

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        return ranked(ctx, self.budget, largest=False)
