"""The correctness column of benchmarks/fisher_peers.py: its comparison helper and the way each peer is called.

On a tiny MLP every method (peers skipped when not installed) must give the loop's Fisher in float64; the
helper must flag a wrong entry and a missing tensor.
"""

from __future__ import annotations

import pytest
import torch

import gradsel
from benchmarks.fisher_peers import METHODS, correctness, installed
from benchmarks.models import Case

from .models import mlp, mlp_batch


def _mlp_case() -> Case:
    model = mlp().double().eval()
    return Case("MLP", model, 6, False, lambda n, seed=0: mlp_batch(n, seed))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "loop"])
def test_method_matches_loop_on_mlp_float64(method):
    if not installed(method):
        pytest.skip(f"{METHODS[method][1]} is not installed")
    case = _mlp_case()
    ts = case.tensors()
    ref = dict(gradsel.fisher_loop(case.model, case.as_batch(ts), progress=False))
    try:
        prepare = METHODS[method][0](case)
    except RuntimeError as exc:  # gradsel without this engine
        pytest.skip(str(exc))
    result = correctness(prepare(ts), ref)
    assert result["ok"], result["text"]
    assert result["missing"] == [] and result["max_rel_err"] < 1e-10


def test_correctness_flags_wrong_and_missing_tensors():
    ref = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([4.0], dtype=torch.float64),
           "bias": torch.tensor([1e-30], dtype=torch.float64)}
    same = {k: v.clone() for k, v in ref.items()}
    same["bias"] = torch.tensor([3e-30], dtype=torch.float64)  # rounding noise of a zero gradient: not an error
    assert correctness(same, ref)["ok"]
    wrong = dict(same, a=torch.tensor([1.0, 2.5], dtype=torch.float64))
    out = correctness(wrong, ref)
    assert not out["ok"] and out["worst"] == "a" and out["max_rel_err"] == pytest.approx(0.25)
    missing = {"a": ref["a"], "b": torch.zeros(3, dtype=torch.float64)}  # wrong size counts as missing
    out = correctness(missing, ref)
    assert not out["ok"] and sorted(out["missing"]) == ["b", "bias"] and "misses 2 of 3" in out["text"]
