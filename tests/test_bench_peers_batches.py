"""``benchmarks/fisher_peers.py --batches N``: a timed call over a list of batches estimates the Fisher of
all of them (gradsel: one fisher() call; a peer: one call per batch, averaged)."""

from __future__ import annotations

import pytest
import torch

import gradsel
from benchmarks.fisher_peers import GRADSEL, METHODS, _per_batch
from benchmarks.models import Case

from .models import mlp, mlp_batch


@pytest.mark.parametrize("method", ["gradsel hooks", "gradsel vmap", "torch.func vmap"])
def test_a_list_of_batches_gives_the_fisher_of_all_of_them(method):
    case = Case("MLP", mlp().double().eval(), 6, False, lambda n, seed=0: mlp_batch(n, seed))
    parts = [case.tensors(seed=s) for s in (1, 2)]
    run = METHODS[method][0](case)
    if method not in GRADSEL:
        run = _per_batch(run)
    got = run(parts)
    both = tuple(torch.cat([a, b]) for a, b in zip(*parts))
    ref = dict(gradsel.fisher_loop(case.model, case.as_batch(both), progress=False))
    assert set(got) == set(ref)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-10, atol=1e-14), k
    alone = run(parts[0])  # a single batch still works as before
    assert not torch.allclose(alone[next(iter(ref))], ref[next(iter(ref))])
