"""random: the control that keeps uniformly random elements at the same budget."""

from __future__ import annotations

import torch

from .base import Context, Policy, masks_from_flat
from .registry import register_policy


@register_policy("random")
class Random(Policy):
    """Keep ``k`` candidate elements drawn uniformly without replacement (seeded by ``seed``). No Fisher."""

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        flat = torch.zeros(ctx.total, dtype=torch.bool)
        flat[torch.randperm(ctx.total, generator=ctx.generator())[: ctx.k]] = True
        return masks_from_flat(flat, ctx.shapes)
