"""Issue 14, point 0: an engine never writes into a tensor it did not allocate.

Autograd returns per-sample gradients that can share storage with other gradients a rule still reads: on
timm's ViT the gradient of ``pos_embed`` (added after the patch conv's output is flattened and transposed)
is a view of the conv's output gradient, and squaring it in place corrupted ``patch_embed.proj.weight``.
"""

import pytest
import torch
from torch import nn

import gradsel


class ConvPlusParameters(nn.Module):
    """A conv whose output gets a parameter added as is, and another after flatten + transpose (as ViT)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.offset = nn.Parameter(torch.randn(1, 6, 1, 1))
        self.pos = nn.Parameter(torch.randn(1, 16, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x) + self.offset
        h = h.flatten(2).transpose(1, 2) + self.pos
        return self.head(h.mean(1))


def _vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3)


def _worst(a, b):
    assert set(a) == set(b)
    return {n: ((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b}


@pytest.mark.parametrize("build, size", [(ConvPlusParameters, 8), (_vit, 32)], ids=["conv+param", "timm-vit"])
def test_fisher_is_exact_where_gradients_alias(build, size):
    torch.manual_seed(0)
    model = build().double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
    ref = gradsel.fisher_loop(model, batch, progress=False)
    got = gradsel.fisher(model, batch, progress=False, engine="vmap", chunk_size=2, per_sample=True)
    worst = _worst(got, ref)
    conv = "conv.weight" if "conv.weight" in ref else "patch_embed.proj.weight"
    assert worst[conv] <= 1e-10, worst  # the tensor the in-place square used to corrupt (error ~1.0)
    assert max(worst.values()) <= 1e-10, worst
    # per-sample contributions add up to the sum of the Fisher
    total = sum(ref[n].sum() for n in ref) * 5
    assert torch.allclose(got.per_sample.sum(), total.double(), rtol=1e-10)
