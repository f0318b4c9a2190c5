"""Tables for the terminal and for markdown."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["table"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[str], *, markdown: bool = False) -> str:
    """Render ``rows`` (dicts) as an aligned text table or a markdown table.

    >>> print(table([{"a": 1, "b": 0.5}], ["a", "b"], markdown=True))
    | a | b |
    |---:|---:|
    | 1 | 0.5 |
    """
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None) for c in columns]
    if markdown:
        head = "| " + " | ".join(columns) + " |"
        rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
        return "\n".join([head, rule] + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])
