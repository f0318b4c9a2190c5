"""A griffe extension for the docs build: bare ``>>>`` examples in docstrings become ``pycon`` code blocks.

gradsel's docstrings carry doctests (run by ``pytest --doctest-modules``) without an ``Examples:`` header;
without this, Markdown would render them as prose (and read ``x[0][1]`` as a reference link).
"""

from __future__ import annotations

import griffe


def fence(text: str) -> str:
    """Wrap each run of ``>>>`` / ``...`` lines and their output (up to a blank line) in a pycon fence."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        if out and out[-1].strip():
            out.append("")
        out.append(indent + "```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(indent + "```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence(obj.docstring.value)
