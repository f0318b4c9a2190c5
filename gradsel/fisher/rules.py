"""Per-sample weight gradients that gradsel forms itself instead of letting vmap form them.

For these layers the vmap engine differentiates with respect to the layer's *output* (a zero probe added
to it), records the layer's input, and builds the per-sample weight gradient from the two. The numbers
are the same; the work is less:

- ``nn.Embedding``: vmap materialises each sample's gradient as a dense table (16 samples × a 30k×256
  table is 500 MB of zeros to write, square and sum). gradsel keeps only the rows a sample looked up.
- ``nn.Conv2d``: vmap's rule for per-sample convolution weight gradients runs a grouped convolution
  that is slow on CPU (no faster than the batch-of-one loop). gradsel unfolds the input (im2col) and
  runs one batched matmul per layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn


class LazyGrads:
    """Per-sample gradients of one parameter that are squared and summed without being stacked."""

    def accumulate(self, acc: torch.Tensor | None, want: bool, mask: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor | None:
        """Add ``Σ_i g_i²`` to ``acc`` (skipped when it is None). If ``want``, return each sample's
        contribution ``Σ_j g_ij²`` over ``mask`` (flat bool, or None for the whole tensor), in ``dtype``."""
        raise NotImplementedError

    def sample_totals(self, dtype: torch.dtype) -> torch.Tensor:
        """Each sample's ``Σ_j g_ij²`` over the whole tensor (to name the sample behind a NaN/Inf)."""
        raise NotImplementedError


@dataclass
class EmbeddingGrads(LazyGrads):
    """Per-sample embedding gradients: sample ``i`` adds ``grads[i, t]`` to row ``ids[i, t]``."""

    module: nn.Embedding
    ids: torch.Tensor  # (c, ...) row looked up at each position
    grads: torch.Tensor  # (c, ..., H) gradient of the loss with respect to each looked-up vector

    def _rows(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sample, row, g²)``: for each (sample, row) pair used, the squared per-sample row gradient."""
        c, length = self.ids.shape[0], self.ids[0].numel()
        ids = self.ids.reshape(c, length).long()
        num_rows = int(ids.max()) + 1
        key = (torch.arange(c, device=ids.device)[:, None] * num_rows + ids).reshape(-1)
        unique, inverse = torch.unique(key, return_inverse=True)
        grads = self.grads.reshape(c * length, -1).to(dtype)
        sums = torch.zeros(len(unique), grads.shape[1], dtype=dtype, device=grads.device).index_add_(0, inverse, grads)
        sample, row = unique // num_rows, unique % num_rows
        sq = sums.square_()
        if self.module.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            sq[row == self.module.padding_idx] = 0
        return sample, row, sq

    def accumulate(self, acc, want, mask, dtype):
        sample, row, sq = self._rows(dtype)
        if acc is not None:
            acc.index_add_(0, row, sq)
        if not want:
            return None
        per_row = sq.sum(1) if mask is None else (sq * mask.reshape(self.module.weight.shape)[row]).sum(1)
        return torch.zeros(self.ids.shape[0], dtype=dtype, device=sq.device).index_add_(0, sample, per_row)

    def sample_totals(self, dtype):
        sample, _, sq = self._rows(dtype)
        return torch.zeros(self.ids.shape[0], dtype=dtype, device=sq.device).index_add_(0, sample, sq.sum(1))


@dataclass
class ConvGrads(LazyGrads):
    """Per-sample ``nn.Conv2d`` weight gradients from the layer's inputs and output gradients.

    Each sample's gradient is formed by the backend's own weight-gradient kernel, squared and added
    before the next is formed: memory holds one per-sample gradient, not the chunk's.
    """

    module: nn.Conv2d
    inputs: torch.Tensor  # (c, 1, Cin, H, W)
    out_grad: torch.Tensor  # (c, 1, Cout, H', W')

    def _grad(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        m = self.module
        return torch.nn.grad.conv2d_weight(self.inputs[i], m.weight.shape, self.out_grad[i], stride=m.stride,
                                           padding=m.padding, dilation=m.dilation, groups=m.groups).to(dtype)

    def accumulate(self, acc, want, mask, dtype):
        c = self.inputs.shape[0]
        part = torch.zeros(c, dtype=dtype, device=self.inputs.device) if want else None
        weights = mask.reshape(-1).to(dtype) if (want and mask is not None) else None
        for i in range(c):
            g = self._grad(i, dtype)
            if acc is not None:
                acc.addcmul_(g, g)  # the square and the sum in one pass over the tensor
            if want:
                flat = g.reshape(-1)
                part[i] = flat.dot(flat) if weights is None else flat.square_().dot(weights)
        return part

    def sample_totals(self, dtype):
        return torch.stack([self._grad(i, dtype).square().sum() for i in range(self.inputs.shape[0])])


def _embedding_grads(module: nn.Embedding, inputs: torch.Tensor, out_grad: torch.Tensor) -> EmbeddingGrads:
    return EmbeddingGrads(module, inputs, out_grad)


def _conv2d_grads(module: nn.Conv2d, inputs: torch.Tensor, out_grad: torch.Tensor) -> ConvGrads:
    return ConvGrads(module, inputs, out_grad)


def _conv_ok(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _embedding_ok(module: nn.Module) -> bool:
    return type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq


RULES = ((_embedding_ok, _embedding_grads), (_conv_ok, _conv2d_grads))


def output_rules(model: nn.Module, names: list[str]) -> dict[str, tuple[nn.Module, object]]:
    """Candidate weights handled by a rule: ``name -> (module, rule)``; tied weights are left to vmap."""
    params = dict(model.named_parameters())
    owners = Counter(id(p) for m in model.modules(remove_duplicate=False) for p in m.parameters(recurse=False))
    found = {}
    for mod_name, module in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if name not in names or params.get(name) is not getattr(module, "weight", None):
            continue
        if owners[id(module.weight)] != 1:
            continue
        for ok, rule in RULES:
            if ok(module):
                found[name] = (module, rule)
    return found
