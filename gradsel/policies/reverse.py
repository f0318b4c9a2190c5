"""reverse: the control that keeps the lowest-Fisher elements at the same budget."""

from __future__ import annotations

import torch

from .base import Context, Policy
from .fish import options, ranked
from .registry import register_policy


@register_policy("reverse")
class Reverse(Policy):
    """Keep the ``k`` candidate elements with the *smallest* Fisher information (a control for ``fish``).

    Options ``budget`` and ``granularity`` as for ``fish`` (``granularity="row"`` / ``"head"``: rows / heads of
    smallest Fisher mass).
    """

    def __init__(self, budget: str = "global", granularity: str = "element"):
        super().__init__(**options(budget, granularity))
        self.budget = budget
        self.granularity = granularity

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        return ranked(ctx, self.budget, largest=False, granularity=self.granularity)
