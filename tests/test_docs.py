"""The python examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import gradsel

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            if "# not run" not in code:
                yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(gradsel.list_policies())
    try:
        namespace = {"__name__": "__doc_example__"}
        exec(compile(code + "\n__ran_to_the_end__ = True\n", "<doc>", "exec"), namespace)
    finally:  # examples register policies: leave the registry as it was for the other tests
        for name in set(gradsel.list_policies()) - before:
            gradsel.policies.unregister_policy(name)
    # the example ran to its last line, its own asserts included (files it writes land in tmp_path)
    assert namespace["__ran_to_the_end__"]


def test_docs_have_examples():
    assert len(list(_blocks())) >= 3
