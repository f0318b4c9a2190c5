"""random: the control that keeps uniformly random elements at the same budget."""

from __future__ import annotations

import torch

from .base import Context, Policy, RowView, _unit_rows, check_granularity, fill_rows, masks_from_flat, row_units
from .registry import register_policy


@register_policy("random")
class Random(Policy):
    """Keep ``k`` candidate elements drawn uniformly without replacement (seeded by ``seed``). No Fisher.

    Options:
        granularity: ``"element"`` (the default) or ``"row"``: whole rows (as for ``fish``) in a random
            order until ``k`` elements are kept, the next row partly filled with random elements of it;
            ``"head"``: rows, with attention projections a head at a time (as for ``fish``).
    """

    def __init__(self, granularity: str = "element"):
        check_granularity(granularity)
        super().__init__(**({} if granularity == "element" else {"granularity": granularity}))
        self.granularity = granularity

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        gen = ctx.generator()
        if self.granularity in ("row", "head"):
            view = RowView(ctx.model, ctx.shapes, self.granularity)
            shapes = view.shapes
            units = row_units(shapes)
            rows = sum(_unit_rows(shapes, u)[0] for u in units)

            def partial(unit, row, r):
                size = _unit_rows(shapes, unit)[1]
                out = torch.zeros(size, dtype=torch.bool)
                out[torch.randperm(size, generator=gen)[:r]] = True
                return out

            masks, info = fill_rows(shapes, units, torch.randperm(rows, generator=gen), ctx.k, partial)
            ctx.info["rows"] = info
            return view.back(masks)
        flat = torch.zeros(ctx.total, dtype=torch.bool)
        flat[torch.randperm(ctx.total, generator=gen)[: ctx.k]] = True
        return masks_from_flat(flat, ctx.shapes)
