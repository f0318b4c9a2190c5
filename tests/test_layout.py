"""The guard around torch's CPU batch-norm backward on a batch of one (``gradsel/fisher/layout.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsel
from gradsel.fisher.layout import norm_gradients_as_inputs

from . import models as M

C, H = 12, 5


def _odd_gradient() -> torch.Tensor:
    """A (1, C, H, H) gradient laid out channels-last with a non-canonical stride on the batch dimension."""
    base = torch.randn(C * H * H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return base.as_strided((1, C, H, H), (C, 1, H * C, C))


def _norm(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "instance":
        return nn.InstanceNorm2d(C, affine=True).double()
    bn = nn.BatchNorm2d(C).double().train(kind == "batch_train")
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    return bn


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw_input", "channels_last_input"])
@pytest.mark.parametrize("kind", ["batch_eval", "batch_train", "instance"])
def test_norm_gradients_equal_those_of_two_copies(kind, channels_last):
    # the truth without the kernel's layout question: the sample twice (a batch of two, laid out plainly) gives
    # the same statistics and twice every gradient
    norm = _norm(kind)
    x = torch.randn(1, C, H, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = _odd_gradient()
    inputs = [x, *norm.parameters()]
    truth = [t / 2 for t in torch.autograd.grad(norm(torch.cat([x, x])), inputs, torch.cat([g, g]).contiguous())]
    with norm_gradients_as_inputs(norm):
        got = torch.autograd.grad(norm(x * 1.0), inputs, g)
    for a, b in zip(got, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the same gradient laid out plainly needs no guard: the truth is torch's own answer there
    plain = torch.autograd.grad(norm(x * 1.0), inputs, g.contiguous())
    for a, b in zip(plain, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_loop_is_exact_on_a_model_whose_batch_norm_gets_a_channels_last_gradient():
    # conv + BatchNorm read as tokens: the reference loop was 4% off before the guard; the vmap engine (no batch of
    # one anywhere) and the hooks engine on chunks of one (the guard again) agree with it to float64 rounding
    model, batch = M.conv_tokens().double(), M.image_batch(n=4, size=6)
    batch = (batch[0].double(), batch[1])
    loop = gradsel.fisher_loop(model, batch, progress=False)
    for engine, chunk in (("vmap", 4), ("hooks", 1), ("hooks", 4)):
        est = gradsel.fisher(model, batch, engine=engine, chunk_size=chunk, progress=False)
        largest = max(float(t.abs().max()) for t in loop.values())
        for name, t in loop.items():
            assert float((est[name] - t).abs().max()) <= 1e-10 * largest, (engine, chunk, name)
