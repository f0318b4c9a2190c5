"""Per-sample weight gradients that gradsel forms itself instead of letting vmap form them.

For these layers the vmap engine differentiates with respect to the layer's *output* (a zero probe added
to it), records the layer's input, and builds the per-sample weight gradient from the two. The numbers
are the same; the work is less:

- ``nn.Embedding``: vmap materialises each sample's gradient as a dense table (16 samples × a 30k×256
  table is 500 MB of zeros to write, square and sum). gradsel keeps only the rows a sample looked up.
- ``nn.Conv1d/2d/3d``: vmap's rule for per-sample convolution weight gradients runs a grouped convolution
  that is slow on CPU where a sample has few output positions (no faster than the batch-of-one loop). gradsel forms them with
  :class:`ConvWeightGrads` (one depthwise convolution over the batch for a depthwise layer, a batched
  matmul over unfolded inputs where a sample has few output positions, the backend's kernel one sample at
  a time elsewhere), the rule the hooks engine uses too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Scratch:
    """One reusable buffer for per-sample gradient blocks that are squared and dropped before the next is
    formed. A fresh block per layer and per block made the allocator map and fault in new pages again and
    again (several MB each time, interleaved with autograd's own buffers): 0.2-0.5 of an ordinary
    forward+backward on BERT, the ViT and the conv nets (benchmarks/results/hooks_breakdown_scratch.md).
    Only a consumer that drops each block before asking for the next one may use it (a sum of two blocks,
    as tied weights need, must not)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` view of the buffer (grown, or made anew for another dtype or device, as needed); its
        contents are left over from the last use."""
        numel = math.prod(shape)
        b = self._buffer
        if b is None or b.numel() < numel or b.dtype != dtype or b.device != device:
            b = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        return b[:numel].view(shape)


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


SMALL_POSITIONS = 64  # output positions per sample up to which conv weight gradients are one batched matmul
#: output positions per sample from which a Conv3d's per-sample weight gradients are one grouped kernel call (the
#: samples as groups): measured on R3D-18's 3×3×3 layers, 2 threads, batch 8, it ran as fast as the batched weight
#: gradient at 1024 and 8192 positions, where the kernel on one sample at a time took 3.5-8× that; at 128 and 16
#: positions (256 and 512 channels) the kernel one sample at a time was faster
GROUPED_POSITIONS = 512
CONV_BLOCK_BYTES = 8 << 20  # per-sample conv weight gradients formed (and squared) at once by the matmul route
GROUPED_BLOCK_BYTES = 64 << 20  # ... by the grouped route


@dataclass
class ConvWeightGrads(LazyGrads):
    """Per-sample ``nn.Conv1d/2d/3d`` weight gradients, formed a block at a time, squared and summed.

    Four exact routes, chosen by shape (see :func:`_conv_route`): a depthwise layer's gradients for the whole chunk
    are one depthwise convolution (:func:`_depthwise_weight_grads`, they are as small as the weight times the
    samples); where each sample has few output positions (the deep layers of a ResNet, ``L ≤ SMALL_POSITIONS``) the
    input is unfolded (im2col; a strided slice for a 1×1 convolution) and one batched matmul ``δ_i · unfold(x_i)ᵀ``
    per block of output channels gives every sample's gradient (per group: a grouped convolution is a batch of
    matmuls), a block small enough to stay in cache while it is squared; elsewhere the backend's weight-gradient
    kernel runs on one sample at a time (large images: each call is a large matrix product) or, for a Conv3d with many
    positions a sample, once for a block of samples taken as the groups of a grouped convolution (the grouped route).
    The calls of a layer called more than once are summed before squaring (the matmul route stacks their positions). A
    call may hold several rows per sample, each sample's one after another (TNT cuts each image into patches on dim
    0): a sample's rows are more of its positions."""

    module: nn.Module
    xs: list  # each call's input (n·rows, Cin, *spatial): rows per sample, one sample's after another
    ds: list  # each call's output gradient (n·rows, Cout, *spatial')
    n: int
    scratch: Scratch | None = None  # where the matmul route forms its blocks (each is consumed before the next)

    def _blocks(self, dtype):
        """``(samples, (r, e), g)``: ``g``, a ``(samples, G, e - r, k)`` tensor in ``dtype`` of ours (fresh, or
        the scratch buffer: valid until the next block), holds those samples' gradients of rows ``r:e`` of
        every group of output channels (the weight seen as ``(G, Cout/G, k)``)."""
        m = self.module
        cout = m.weight.shape[0]
        route = _conv_route(m, self.ds, self.n)
        if route == "depthwise":  # the calls summed before squaring; (n, C, multiplier, taps), ours
            g = None
            for x, t in zip(self.xs, self.ds):
                one = _depthwise_weight_grads(m, x, t)
                one = one if one.shape[0] == self.n else one.view(self.n, -1, *one.shape[1:]).sum(1)
                g = one if g is None else g.add_(one)
            yield slice(0, self.n), (0, g.shape[2]), g.to(dtype)
            return
        if route == "matmul":
            groups = m.groups
            a = _positions([_per_sample(_unfold(m, x), self.n) for x in self.xs])
            d = _positions([_per_sample(t.reshape(t.shape[0], cout, -1), self.n) for t in self.ds])
            a, d = a.to(dtype), d.to(dtype)
            positions, k = d.shape[2], a.shape[1] // groups
            # (n, G, L, k) and (n, G, Cout/G, L): one matmul per (sample, group)
            a = a.reshape(self.n, groups, k, positions).transpose(2, 3)
            d = d.reshape(self.n, groups, cout // groups, positions)
            per = cout // groups
            # output channels per block (the same rows of every group): the block's squares stay in cache
            rows = max(1, min(per, CONV_BLOCK_BYTES // max(1, k * d.element_size() * self.n * groups)))
            for r in range(0, per, rows):
                e = min(per, r + rows)
                out = None if self.scratch is None else self.scratch.take(
                    (self.n, groups, e - r, k), d.dtype, d.device)
                yield slice(0, self.n), (r, e), torch.matmul(d[:, :, r:e], a, out=out)  # (n, G, e - r, k)
            return
        weight_grad = _WEIGHT_GRAD[m.weight.dim()]
        if route == "grouped":  # samples as groups: one kernel call for a block of samples, the calls summed
            size = math.prod(m.weight.shape) * self.ds[0].element_size()  # (the weight may be an FSDP2 shard)
            step = max(1, min(self.n, GROUPED_BLOCK_BYTES // max(1, size)))
            for i in range(0, self.n, step):
                s = min(self.n, i + step) - i
                g = None
                for x, t in zip(self.xs, self.ds):
                    rows = x.shape[0] // self.n  # a sample's rows: summed after the call
                    xi, ti = x[i * rows:(i + s) * rows], t[i * rows:(i + s) * rows]
                    one = weight_grad(xi.reshape(1, -1, *xi.shape[2:]), (s * rows * cout, *m.weight.shape[1:]),
                                      ti.reshape(1, -1, *ti.shape[2:]), stride=m.stride, padding=conv_padding(m),
                                      dilation=m.dilation, groups=s * rows * m.groups)
                    one = one.view(s, rows, -1).sum(1) if rows > 1 else one.view(s, -1)
                    g = one if g is None else g.add_(one)
                yield slice(i, i + s), (0, cout // m.groups), g.to(dtype).view(s, m.groups, cout // m.groups, -1)
            return
        for i in range(self.n):
            g = None
            for x, t in zip(self.xs, self.ds):
                rows = x.shape[0] // self.n  # a sample's rows: the kernel sums their gradients
                one = weight_grad(x[i * rows:(i + 1) * rows], m.weight.shape, t[i * rows:(i + 1) * rows],
                                  stride=m.stride, padding=conv_padding(m), dilation=m.dilation, groups=m.groups)
                g = one if g is None else g.add_(one)
            yield slice(i, i + 1), (0, cout // m.groups), g.to(dtype).reshape(1, m.groups, cout // m.groups, -1)

    def accumulate(self, acc, want, mask, dtype):
        groups = self.module.groups
        part = torch.zeros(self.n, dtype=dtype, device=self.ds[0].device) if want else None
        acc3 = None if acc is None else acc.view(groups, acc.shape[0] // groups, -1)
        m3 = None if mask is None else mask.reshape(groups, self.module.weight.shape[0] // groups, -1).to(dtype)
        for samples, (r, e), g in self._blocks(dtype):
            if m3 is None:  # one pass over each sample's gradient (acc += g_i * g_i): no tensor of squares
                for i, gi in enumerate(g):
                    if acc3 is not None:
                        acc3[:, r:e].addcmul_(gi, gi)
                    if want:
                        part[samples.start + i] += torch.dot(gi.reshape(-1), gi.reshape(-1))
                continue
            sq = g.square_()
            if acc3 is not None:
                acc3[:, r:e].add_(sq.sum(0))
            part[samples] += (sq * m3[:, r:e]).reshape(sq.shape[0], -1).sum(1)
        return part

    def sample_totals(self, dtype):
        part = torch.zeros(self.n, dtype=dtype, device=self.ds[0].device)
        for samples, _, g in self._blocks(dtype):
            part[samples] += g.square_().reshape(g.shape[0], -1).sum(1)
        return part


@dataclass
class StandardizedWeightGrads(ConvWeightGrads):
    """Per-sample weight gradients of a convolution whose kernel is its weight standardised per output channel
    first (timm's ``StdConv2d`` and ``ScaledStdConv2d``: ``W = a·(w − μ)/√(σ² + ε)`` over each channel's fan-in,
    biased variance, ``a`` the gain times the scale or 1). The convolution's per-sample gradients ``G_i`` of ``W``
    come a block of output channels at a time as :class:`ConvWeightGrads` forms them, and each block is taken back
    through the standardisation, a BatchNorm over the channel's row: ``∂w_i = a/√(σ² + ε) · (G_i − mean(G_i) −
    ŵ·mean(G_i ŵ))``, ``ŵ`` the standardised weight, means over the row."""

    standard: torch.Tensor | None = None  # ŵ as (G, Cout/G, k)
    coef: torch.Tensor | None = None  # a/√(σ² + ε) as (G, Cout/G, 1)
    # each sample's Σ_k G_i ŵ per output channel, (n, G, Cout/G), once a pass over every block has run: the gain's
    # per-sample gradient up to its scale (GainGrads reads it instead of a convolution of its own)
    dots: torch.Tensor | None = None

    def _blocks(self, dtype):
        dots = torch.empty(self.n, *self.standard.shape[:2], dtype=dtype, device=self.standard.device)
        for samples, (r, e), g in super()._blocks(dtype):
            # in place on the block (ours): a fresh tensor of its size would cost more in page faults than the
            # arithmetic; the row dot products one sample at a time (an einsum over all of them copies the block)
            w, c = self.standard[:, r:e].to(dtype), self.coef[:, r:e].to(dtype)
            part = dots[samples, :, r:e]
            for i, gi in enumerate(g):
                part[i] = torch.einsum("grk,grk->gr", gi, w)
            mean = part.unsqueeze(-1) / g.shape[-1]
            yield samples, (r, e), g.sub_(g.mean(-1, keepdim=True)).addcmul_(w, mean, value=-1).mul_(c)
        self.dots = dots


@dataclass
class GainGrads(LazyGrads):
    """Per-sample gradients of a weight-standardised convolution's gain, ``scale · Σ_k G_i ŵ`` per output channel:
    read from the weight's pass (:class:`StandardizedWeightGrads` keeps those sums) when it has run, else from
    ``fallback()`` (one batched convolution with the standardised kernel)."""

    weight: StandardizedWeightGrads | None
    fallback: Callable[[], torch.Tensor]
    scale: float

    def _grads(self, dtype):
        w = self.weight
        g = self.fallback() if w is None or w.dots is None else w.dots.reshape(w.n, -1) * self.scale
        return g.to(dtype).reshape(g.shape[0], -1)

    def accumulate(self, acc, want, mask, dtype):
        sq = self._grads(dtype).square()
        if acc is not None:
            acc.view(-1).add_(sq.sum(0))
        if not want:
            return None
        return sq.sum(1) if mask is None else sq @ mask.reshape(-1).to(dtype)

    def sample_totals(self, dtype):
        return self._grads(dtype).square().sum(1)


def _positions(ts: list[torch.Tensor]) -> torch.Tensor:
    """The calls' ``(n, C, L)`` tensors as one, their positions side by side (no copy for one call)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 2)


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """``(n·rows, C, L)`` as ``(n, C, rows·L)``: each sample's rows side by side as more positions (a view when
    there is one row a sample)."""
    if t.shape[0] == n:
        return t
    return t.reshape(n, -1, *t.shape[1:]).transpose(1, 2).reshape(n, t.shape[1], -1)


def _conv_route(module: nn.Module, ds: list, n: int | None = None) -> str:
    """``"depthwise"`` for a depthwise convolution (one input channel a group, any size); ``"matmul"`` for a
    1×1 convolution without padding (no unfold: a strided slice) and where a sample has few output positions (not for
    a Conv3d: torch has no 3-D unfold); ``"grouped"`` (the samples as the groups of one call) for a Conv3d with
    ``GROUPED_POSITIONS`` or more (on 2-D layers it matched the batched gradient in isolation but made the engine
    slower on ResNet-50); ``"kernel"`` (one sample per call) elsewhere. Measured on the 3×3 layers of a ResNet-18/50
    on CPU: the kernel on one sample is 3-5× the batched weight gradient at 4×4 or 8×8 outputs, the matmul 1.5-2×; at
    16×16 the two are even (the kernel slightly ahead), from 32×32 on the kernel is within 10% of the batched gradient
    and the unfold costs more. The depthwise route beat both on every depthwise shape of MobileNetV2, EfficientNet and
    ConvNeXt measured (3×3-7×7, stride 1-2, 2²-64², one and two threads: 1.2-30× faster)."""
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    if all(k == 1 for k in module.kernel_size) and all(p == 0 for p in conv_padding(module)):
        return "matmul"
    positions = sum(t.numel() // t.shape[1] for t in ds) // (n or ds[0].shape[0])  # a sample's, over its rows
    if module.weight.dim() == 5:  # Conv3d: torch has no 3-D unfold
        return "grouped" if positions >= GROUPED_POSITIONS else "kernel"
    return "matmul" if positions <= SMALL_POSITIONS else "kernel"


def _depthwise_weight_grads(module: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(n, C, multiplier, taps)``: every sample's weight gradient of a depthwise convolution (``groups`` =
    input channels ``C``, ``multiplier`` output channels a group), as one depthwise convolution per multiplier
    over the whole batch. Tap ``t`` of sample ``i``'s channel is ``Σ_p δ_i[p] · x_i[p·stride + t·dilation]``
    (``x`` zero-padded): the input, its ``n·C`` channels side by side, correlated with each channel's output
    gradient as the kernel, the layer's stride as the dilation and its dilation as the stride. The result has
    at least the kernel's size (the positions that a stride leaves unread add rows past it), cut to it."""
    n, c = x.shape[:2]
    multiplier = module.out_channels // c
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    inputs = x.reshape(1, n * c, *x.shape[2:])
    grads = d.reshape(n, c, multiplier, *d.shape[2:])
    cut = (..., *(slice(0, k) for k in module.kernel_size))
    padding = conv_padding(module)
    return torch.stack([
        conv(inputs, grads[:, :, j].reshape(n * c, 1, *d.shape[2:]), padding=padding, stride=module.dilation,
             dilation=module.stride, groups=n * c)[cut].reshape(n, c, -1)
        for j in range(multiplier)], 2)


def _unfold(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, Cin·kernel, L)``: each output position's receptive field (im2col), in the weight's order."""
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        padding, dilation = (0, *conv_padding(module)), (1, *module.dilation)
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, conv_padding(module), module.dilation
    if all(k == 1 for k in kernel) and all(p == 0 for p in padding):
        return x[(slice(None), slice(None), *(slice(None, None, st) for st in stride))].reshape(*x.shape[:2], -1)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


#: the backend's weight-gradient kernel by the weight's rank (Conv1d, Conv2d, Conv3d)
_WEIGHT_GRAD = {3: torch.nn.grad.conv1d_weight, 4: torch.nn.grad.conv2d_weight, 5: torch.nn.grad.conv3d_weight}


def _embedding_grads(module: nn.Embedding, inputs: torch.Tensor, out_grad: torch.Tensor) -> EmbeddingGrads:
    return EmbeddingGrads(module, inputs, out_grad)


def _conv_grads(module: nn.Module, inputs: torch.Tensor, out_grad: torch.Tensor) -> ConvWeightGrads:
    """The vmap engine's conv rule: its per-sample captures are ``(c, 1, C, *spatial)``."""
    return ConvWeightGrads(module, [inputs.flatten(0, 1)], [out_grad.flatten(0, 1)], inputs.shape[0])


def conv_padding(module: nn.Module) -> tuple[int, ...] | None:
    """A convolution's zero padding on each side, per spatial dim: ``padding="valid"`` is none and ``"same"`` half
    the dilated kernel's reach; None where ``"same"`` pads unevenly (an even reach: torch pads one more at the
    end), which the rules do not take."""
    if not isinstance(module.padding, str):
        return tuple(module.padding)
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    reach = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    return None if any(r % 2 for r in reach) else tuple(r // 2 for r in reach)


def plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` (exact types; torchvision's video ResNets' Conv3d subclasses, which only add a static
    method, too) with zero padding the rule takes (:func:`conv_padding`)."""
    t = type(module)
    known = t.__module__.startswith("torchvision.models.video.resnet") and t.__name__ in ("Conv3DSimple",
                                                                                           "Conv3DNoTemporal")
    return ((t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or known) and module.padding_mode == "zeros"
            and conv_padding(module) is not None)


def _embedding_ok(module: nn.Module) -> bool:
    return type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq


RULES = ((_embedding_ok, _embedding_grads), (plain_conv, _conv_grads))


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
