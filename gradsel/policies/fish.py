"""fish: the top-k elements by Fisher information (FISH Mask, Sung et al. 2021; FISH-Tuning, Xue et al. 2025)."""

from __future__ import annotations

import torch

from ..errors import GradselError
from .base import Context, Policy, RowView, check_granularity, row_units, split_budget, top_k, top_rows
from .registry import register_policy

BUDGETS = ("global", "per_tensor")


def ranked(ctx: Context, budget: str, largest: bool, granularity: str = "element") -> dict[str, torch.Tensor]:
    """Top-k (or bottom-k) of the Fisher, over all candidates or within each tensor, by element or by row.

    With ``granularity="row"`` the ranked groups are the rows of :func:`gradsel.policies.base.row_units`
    (a weight's output rows, with their bias entries: :class:`gradsel.policies.base.RowView`) by Fisher
    mass; ``per_tensor`` then splits the budget over those units (a weight and its bias together).
    ``ctx.info["rows"]`` records the row counts.
    """
    if budget not in BUDGETS:
        raise GradselError(f"budget={budget!r} is not known: use one of {BUDGETS}")
    check_granularity(granularity)
    scores = ctx.scores()
    if granularity != "element":  # whole rows (output rows first, heads as blocks of rows where asked)
        view = RowView(ctx.model, ctx.shapes, granularity)
        scores = view.rows({n: scores[n] for n in ctx.candidates})
        if budget == "global":
            masks, info = top_rows(scores, ctx.k, largest=largest)
            ctx.info["rows"] = info
            return view.back(masks)
        units = row_units(view.shapes)
        parts = split_budget([sum(scores[n].numel() for n in u) for u in units], ctx.k)
        masks, whole, partial = {}, 0, []
        for unit, k in zip(units, parts):
            got, info = top_rows({n: scores[n] for n in unit}, k, largest=largest)
            masks.update(got)
            whole += info["whole_rows"]
            partial += [info["partial_row"]] if info["partial_row"] else []
        ctx.info["rows"] = {"whole_rows": whole, "partial_rows": partial}
        return view.back(masks)
    if budget == "global":
        return top_k({n: scores[n] for n in ctx.candidates}, ctx.k, largest=largest)
    parts = split_budget([scores[n].numel() for n in ctx.candidates], ctx.k)
    masks = {}
    for name, k in zip(ctx.candidates, parts):
        masks.update(top_k({name: scores[name]}, k, largest=largest))
    return masks


def options(budget: str, granularity: str) -> dict:
    """The options to record: ``granularity`` only when it is not the default (older files stay identical)."""
    check_granularity(granularity)
    return {"budget": budget} if granularity == "element" else {"budget": budget, "granularity": granularity}


@register_policy("fish")
class Fish(Policy):
    """Keep the ``k`` candidate elements with the largest Fisher information.

    Options:
        budget: ``"global"`` (one ranking over all candidates, the default, as FISH Mask) or
            ``"per_tensor"`` (each tensor keeps its share of ``k``).
        granularity: ``"element"`` (the default) or ``"row"``: whole output rows of the weights (of Linear
            and GPT-2's ``Conv1D``, output channels of Conv and ConvTranspose, each with its bias entry) by
            Fisher mass, the next row in the ranking partly filled so that exactly ``k`` elements are kept.
            Train such a selection with :func:`gradsel.rowsparse.row_sparse` to compute the weight gradient
            of the kept rows only.
            ``"head"``: the same, with the query, key and value projections' rows taken a whole attention
            head at a time (where the model says where its heads are: :func:`gradsel.policies.base.attention_heads`).
    """

    def __init__(self, budget: str = "global", granularity: str = "element"):
        super().__init__(**options(budget, granularity))
        self.budget = budget
        self.granularity = granularity

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        return ranked(ctx, self.budget, largest=True, granularity=self.granularity)
