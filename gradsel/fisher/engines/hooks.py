"""The per-layer engine: one ordinary forward and backward; per-layer rules form the squares.

One ordinary forward over the chunk, one backward of the sum of the per-sample losses, taken with respect to
zero "roots" added to the first rule layers' outputs only (``torch.autograd.grad(inputs=roots)``): autograd
skips every weight gradient and computes activation gradients only; no ``.grad`` is written. Forward hooks keep each rule layer's input, tensor hooks
on its output keep the output gradient ``δ`` (in this engine's own lists, never on the user's modules). As
samples do not interact in eval mode, ``δ_i`` is what the batch of one would give, and each rule builds the
per-sample parameter gradient (or only its square) from ``(input_i, δ_i)``:

- ``nn.Linear``: without a token axis ``Σ_i g_i² = (δ²)ᵀ(a²)`` (no per-sample tensor); with tokens (or a
  layer called more than once, its calls stacked as tokens) ``g_i = δ_iᵀ a_i`` a block of samples at a time;
- ``nn.Conv1d/2d/3d``: each sample's weight gradient by the route that suits the shape (a depthwise convolution,
  a batched matmul, the backend's kernel one sample or a block of samples at a time:
  :class:`~gradsel.fisher.rules.ConvWeightGrads`), calls summed;
- ``nn.Embedding``: the looked-up rows (:class:`~gradsel.fisher.rules.EmbeddingGrads`);
- LayerNorm, GroupNorm, BatchNorm (running statistics) and every bias: closed forms.

Beyond the rules: a layer called more than once sums its calls; a weight tied across rule layers (GPT-2's LM
head) sums each sample's dense gradients before squaring; outputs and top-level parameters shaped like a
batch of one (position embeddings, ViT's ``pos_embed``/``cls_token``) get a copy per sample; a module without
rule (``nn.MultiheadAttention``) gets a local ``torch.func`` per-sample gradient from its captured inputs and
output gradients. Every parameter's uses are counted in autograd's graph, and the copies and local
gradients are checked once against the loop. What is left (a weight also read outside its layer, a layer
whose output has no batch dimension) goes to a fallback engine that differentiates only those parameters
(the vmap engine, or the loop where vmap cannot run the model).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import warnings
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ...errors import GradselError
from ..batches import BatchReader, logits_of
from ..layout import norm_gradients_as_inputs
from ..rules import (ConvWeightGrads, EmbeddingGrads, GainGrads, LazyGrads, Scratch, StandardizedWeightGrads,
                     conv_padding, plain_conv)
from ..swap import swapped_call, tensor_slots
from .elementwise import ElementwiseUses

__all__ = ["HooksEngine", "OuterSquares", "BlockGrads"]

# per-sample gradients formed at once by a rule, about a core's L2 cache: the scratch buffer stays small and
# a block is squared while still in cache (32 MiB blocks, all 16 samples of most layers, were level on the ViT
# in one run and 0.1-0.17 of a floor slower in another: benchmarks/results/hooks_breakdown_blocks*.md)
BLOCK_BYTES = 2 << 20


# -- lazy per-sample gradients -----------------------------------------------------------------------------

@dataclass
class OuterSquares(LazyGrads):
    """``g_i = δ_i a_iᵀ`` (a Linear without token axis): ``Σ_i g_i² = (δ²)ᵀ(a²)``, no per-sample tensor."""

    delta: torch.Tensor  # (n, out)
    inputs: torch.Tensor  # (n, in)

    def _squares(self, dtype):
        return self.delta.to(dtype).square(), self.inputs.to(dtype).square()

    def accumulate(self, acc, want, mask, dtype):
        d2, a2 = self._squares(dtype)
        if acc is not None:
            acc.addmm_(d2.T, a2)
        if not want:
            return None
        if mask is None:
            return d2.sum(1) * a2.sum(1)
        return ((d2 @ mask.reshape(d2.shape[1], a2.shape[1]).to(dtype)) * a2).sum(1)

    def sample_totals(self, dtype):
        d2, a2 = self._squares(dtype)
        return d2.sum(1) * a2.sum(1)


@dataclass
class BlockGrads(LazyGrads):
    """Per-sample gradients formed ``block`` samples at a time by ``make(start, stop, scratch)``, a
    ``(stop - start, *shape)`` tensor of its own (in ``scratch`` where one is given: valid until the next
    call); each block is squared and summed before the next is formed."""

    make: Callable[[int, int, Scratch | None], torch.Tensor]
    n: int
    block: int
    scratch: Scratch | None = None

    def _squares(self, dtype):
        for start in range(0, self.n, self.block):
            g = self.make(start, min(self.n, start + self.block), self.scratch)
            g = g.to(dtype) if g.dtype != dtype else g
            yield g.reshape(g.shape[0], -1).square_()  # a tensor made by make(): ours to write

    def accumulate(self, acc, want, mask, dtype):
        if mask is not None:  # each sample's contribution over the mask: the squares are needed as a tensor
            weights = mask.reshape(-1).to(dtype)
            parts = []
            for sq in self._squares(dtype):
                if acc is not None:
                    acc.view(-1).add_(sq.sum(0))
                parts.append(sq @ weights)
            return torch.cat(parts)
        # one pass over each sample's gradient (``acc += g_i * g_i``), no tensor of squares: a third of the
        # memory traffic of square, sum, add
        flat_acc = None if acc is None else acc.view(-1)
        parts = []
        for start in range(0, self.n, self.block):
            g = self.make(start, min(self.n, start + self.block), self.scratch)
            g = (g.to(dtype) if g.dtype != dtype else g).reshape(g.shape[0], -1)
            for row in g:
                if flat_acc is not None:
                    flat_acc.addcmul_(row, row)
                if want:
                    parts.append(torch.dot(row, row))
        return torch.stack(parts) if want else None

    def sample_totals(self, dtype):
        return torch.cat([sq.sum(1) for sq in self._squares(dtype)])


@dataclass
class ZeroGrads(LazyGrads):
    """A candidate the loss does not depend on (a layer the forward never runs): every gradient is zero."""

    n: int

    def accumulate(self, acc, want, mask, dtype):
        return torch.zeros(self.n, dtype=dtype) if want else None

    def sample_totals(self, dtype):
        return torch.zeros(self.n, dtype=dtype)


# -- rules: (module, inputs of each call, output gradients of each call, wanted attrs) -> {attr: grads} ----

def _stack_tokens(ts: list[torch.Tensor], n: int) -> torch.Tensor:
    """``(n, positions, features)``: every call's positions side by side."""
    flat = [t.reshape(n, -1, t.shape[-1]) for t in ts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def _linear(module: nn.Module, xs, ds, want, n, transposed: bool = False):
    """``y = x Wᵀ + b`` (``transposed``: ``y = x W + b``, transformers' ``Conv1D``)."""
    out = {}
    if len(xs) == 1 and xs[0].dim() == 2:  # g_i = δ_i a_iᵀ: Σ_i g_i² = (δ²)ᵀ(a²)
        if "weight" in want:
            out["weight"] = OuterSquares(xs[0], ds[0]) if transposed else OuterSquares(ds[0], xs[0])
        if "bias" in want:
            out["bias"] = ds[0]
        return out
    a, d = _stack_tokens(xs, n), _stack_tokens(ds, n)
    if "weight" in want:
        out["weight"] = _token_grads(*((a, d) if transposed else (d, a)), n)
    if "bias" in want:
        out["bias"] = d.sum(1)
    return out


def _token_grads(left: torch.Tensor, right: torch.Tensor, n: int) -> BlockGrads:
    """Each sample's ``Σ_t left_tᵀ right_t`` from ``(n, tokens, ·)`` tensors (a Linear's weight gradient over the
    tokens: ``left`` the output gradients, ``right`` the inputs), a block of samples at a time."""
    shape = (left.shape[2], right.shape[2])

    def make(s, e, scratch=None):
        out = None if scratch is None else scratch.take((e - s, *shape), left.dtype, left.device)
        return torch.bmm(left[s:e].transpose(1, 2), right[s:e], out=out)

    return BlockGrads(make, n, max(1, BLOCK_BYTES // max(1, shape[0] * shape[1] * left.element_size())))


def _transposed_linear(module: nn.Module, xs, ds, want, n):
    return _linear(module, xs, ds, want, n, transposed=True)


def _conv(module: nn.Module, xs, ds, want, n):
    if xs[0].dim() > module.weight.dim():  # (n, rows, C, *spatial): each sample's rows (TNT's patches) as positions
        xs, ds = [x.flatten(0, 1) for x in xs], [d.flatten(0, 1) for d in ds]
    out = {}
    if "weight" in want:
        out["weight"] = ConvWeightGrads(module, xs, ds, n)
    if "bias" in want:
        out["bias"] = sum(d.reshape(n, -1, d.shape[1], d[0, 0].numel()).sum((1, 3)) for d in ds)
    return out


_TRANSPOSED = {nn.ConvTranspose1d: nn.Conv1d, nn.ConvTranspose2d: nn.Conv2d, nn.ConvTranspose3d: nn.Conv3d}


def _conv_transpose(module: nn.Module, xs, ds, want, n):
    """``nn.ConvTranspose1d/2d/3d``: the adjoint of the convolution with the same weight, stride, padding, dilation
    and groups, so its weight gradient is that convolution's, run on the output gradient with the input as the
    gradient (``Σ ⟨δ, convT(x, W)⟩ = Σ ⟨x, conv(δ, W)⟩``): the conv rule on a stand-in convolution (on the meta
    device) from the output's channels to the input's, whose weight has the transposed layer's shape. Any
    ``output_padding`` (or ``output_size=``) only adds output rows that the convolution does not reach."""
    kind = next(conv for t, conv in _TRANSPOSED.items() if isinstance(module, t))  # (FSDP2 subclasses the module)
    conv = kind(
        module.out_channels, module.in_channels, module.kernel_size, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=module.groups, bias=False, device="meta")
    out = _conv(conv, ds, xs, {"weight"} & set(want), n)
    if "bias" in want:
        out["bias"] = _conv(module, xs, ds, {"bias"}, n)["bias"]
    return out


def _padded_conv(module: nn.Module, xs, ds, want, n):
    """A convolution that zero-pads its input itself first (TensorFlow's "SAME"): smp's Conv2dStaticSamePadding (a
    fixed ``ZeroPad2d`` module), timm's Conv2dSame (``pad_same``, from the input's size); the conv rule on the
    padded input."""
    if hasattr(module, "static_padding"):
        xs = [module.static_padding(x) for x in xs]
    else:
        from timm.layers.padding import pad_same

        xs = [pad_same(x, module.weight.shape[-2:], module.stride, module.dilation) for x in xs]
    return _conv(module, xs, ds, want, n)


def _std_conv(module: nn.Module, xs, ds, want, n):
    """timm's weight-standardised convolutions (``StdConv2d``, ``ScaledStdConv2d`` and their "SAME" kin, the
    kernels of BiT and the NF-nets): the kernel is ``W = a·ŵ``, ``ŵ`` the weight standardised over each output
    channel's fan-in and ``a`` the gain times the scale (1 without a gain). The weight's per-sample gradients are
    the convolution's, taken back through the standardisation (:class:`~gradsel.fisher.rules.StandardizedWeightGrads`);
    the gain's are ``scale · Σ_k G_i ŵ`` per channel, sums that pass forms (or, without it, ``scale · Σ_p δ·conv(x, ŵ)``
    from one batched convolution); the bias's the conv rule's."""
    if getattr(module, "same_pad", False):
        from timm.layers.padding import pad_same

        xs = [pad_same(x, module.kernel_size, module.stride, module.dilation) for x in xs]
    if xs[0].dim() > module.weight.dim():  # (n, rows, C, *spatial): each sample's rows as positions
        xs, ds = [x.flatten(0, 1) for x in xs], [d.flatten(0, 1) for d in ds]
    dtype = ds[0].dtype
    w = module.weight.detach().to(dtype)
    rows = w.reshape(w.shape[0], -1)
    centred = rows - rows.mean(1, keepdim=True)  # two passes, as exact as var_mean and 10x faster on CPU
    inv = (centred.square().mean(1, keepdim=True) + module.eps).rsqrt()
    standard = centred.mul_(inv)
    gain = getattr(module, "gain", None)
    a = 1.0 if gain is None else gain.detach().to(dtype).reshape(-1, 1) * module.scale
    out = _conv(module, xs, ds, {"bias"} & set(want), n)
    if "weight" in want:
        groups, per = module.groups, w.shape[0] // module.groups
        out["weight"] = StandardizedWeightGrads(module, xs, ds, n, standard=standard.reshape(groups, per, -1),
                                                coef=(a * inv).reshape(groups, per, 1))
    if "gain" in want:
        def by_convolution():
            kernel = standard.reshape(w.shape)
            hats = [F.conv2d(x, kernel, None, module.stride, conv_padding(module), module.dilation, module.groups)
                    for x in xs]
            return _channel_affine(hats, ds, {"weight"}, n)["weight"] * module.scale

        out["gain"] = GainGrads(out.get("weight"), by_convolution, module.scale)
    return out


def _embedding(module: nn.Embedding, xs, ds, want, n):
    ids = torch.cat([x.reshape(n, -1) for x in xs], 1) if len(xs) > 1 else xs[0].reshape(n, -1)
    return {"weight": EmbeddingGrads(module, ids, _stack_tokens(ds, n))}


def _layernorm(module: nn.LayerNorm, xs, ds, want, n):
    shape = tuple(module.normalized_shape)
    return _trailing_affine([F.layer_norm(x, shape, None, None, module.eps) for x in xs], ds, shape, want, n)


def _rmsnorm(module: nn.Module, xs, ds, want, n):
    """torch's ``nn.RMSNorm`` and timm's ``RmsNorm``: ``x / √(mean(x²) + ε)`` over the trailing shape, times the
    weight (no bias); ``eps=None`` is the dtype's epsilon, as torch takes it."""
    shape = tuple(module.normalized_shape)
    return _trailing_affine([F.rms_norm(x, shape, None, module.eps) for x in xs], ds, shape, want, n)


def _trailing_affine(xhats, ds, shape, want, n):
    """Each sample's gradients of an affine part over the trailing ``shape``, given the normalised inputs."""
    out = {}
    if "weight" in want:
        out["weight"] = sum((d * h).reshape(n, -1, *shape).sum(1) for d, h in zip(ds, xhats))
    if "bias" in want:
        out["bias"] = sum(d.reshape(n, -1, *shape).sum(1) for d in ds)
    return out


def _layernorm2d(module: nn.LayerNorm, xs, ds, want, n):
    """timm's and torchvision's ``LayerNorm2d``: a LayerNorm over the channels (dim 1) of ``(N, C, *spatial)``."""
    return _layernorm(module, [x.movedim(1, -1) for x in xs], [d.movedim(1, -1) for d in ds], want, n)


def _smp_layernorm(module: nn.LayerNorm, xs, ds, want, n):
    """smp's Mix Transformer LayerNorm: over the channels (dim 1) of a 4-D input, over the trailing dims of others."""
    return (_layernorm2d if xs[0].dim() == 4 else _layernorm)(module, xs, ds, want, n)


def _channel_affine(xhats, ds, want, n):
    """Per-sample gradients of an affine map per channel (dim 1) of ``(n·rows, C, *positions)``: each sample's
    rows, one sample's after another, are more of its positions."""
    def per_sample(t):
        return t.reshape(n, -1, t.shape[1], t[0, 0].numel()).sum((1, 3))

    out = {}
    if "weight" in want:
        out["weight"] = sum(per_sample(d * h) for d, h in zip(ds, xhats))
    if "bias" in want:
        out["bias"] = sum(per_sample(d) for d in ds)
    return out


def _channel_stats(module: nn.Module, xs, n):
    """For a BatchNorm (running statistics) or GroupNorm whose inputs hold one sample a row of dim 0 and some
    positions, ``x -> (mean, var)`` of each ``(sample, channel)`` as ``(n·C,)`` tensors (what
    :func:`_normalized_channel_sums` reads); else None (the elementwise forms: tokens flattened into dim 0, as
    LeViT's ``bn(x.flatten(0, 1))`` arrives here as ``(n·T, C)``, or nothing to sum over)."""
    if any(x.shape[0] != n or x.dim() < 3 for x in xs):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        stats = (module.running_mean.repeat(n), module.running_var.repeat(n))
        return lambda x: stats
    if isinstance(module, nn.GroupNorm):
        def group_stats(x):  # each (sample, group)'s biased variance and mean, given to each of its channels
            var, mean = torch.var_mean(x.reshape(n, module.num_groups, -1), dim=-1, correction=0)
            per = x.shape[1] // module.num_groups
            return mean.repeat_interleave(per, 1).reshape(-1), var.repeat_interleave(per, 1).reshape(-1)
        return group_stats
    return None


def _normalized_channel_sums(xs, ds, stats, eps, want, n):
    """What :func:`_channel_affine` gives for ``x̂ = (x − mean)/√(var + eps)`` per channel, ``stats`` from
    :func:`_channel_stats`, without forming ``x̂`` or ``d·x̂``: the sample seen as part of the channel,
    ``(1, n·C, positions)``, one eval-mode BatchNorm backward gives each ``(sample, channel)``'s ``Σ d·x̂`` and
    ``Σ d`` in one pass over ``x`` and ``d`` (the elementwise forms cost 3-10x that in allocations and passes on
    ResNet-50's layers)."""
    weight = bias = None
    for x, d in zip(xs, ds):
        mean, var = (t.to(x.dtype) for t in stats(x))
        c = x.shape[1]
        # one layout for both: torch's CPU batch-norm backward has misread a gradient laid out unlike its input (layout.py)
        _, w, b = torch.ops.aten.native_batch_norm_backward(
            d.reshape(1, n * c, -1).contiguous(), x.reshape(1, n * c, -1).contiguous(), None, mean, var, None, None,
            False, eps, [False, "weight" in want, "bias" in want])
        if "weight" in want:
            weight = w.view(n, c) if weight is None else weight + w.view(n, c)
        if "bias" in want:
            bias = b.view(n, c) if bias is None else bias + b.view(n, c)
    return {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}


def _groupnorm(module: nn.GroupNorm, xs, ds, want, n):
    stats = _channel_stats(module, xs, n)
    if stats is not None:
        return _normalized_channel_sums(xs, ds, stats, module.eps, want, n)
    return _channel_affine([F.group_norm(x, module.num_groups, None, None, module.eps) for x in xs], ds, want, n)


def _batchnorm(module: nn.modules.batchnorm._BatchNorm, xs, ds, want, n):
    """BatchNorm on its running statistics, a per-channel affine map; tokens flattened into dim 0 (LeViT's
    ``bn(x.flatten(0, 1))``) arrive here as ``(n·T, C)`` (see :func:`_per_layer`'s grouped captures)."""
    stats = _channel_stats(module, xs, n)
    if stats is not None:
        return _normalized_channel_sums(xs, ds, stats, module.eps, want, n)
    xhats = [F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps) for x in xs]
    return _channel_affine(xhats, ds, want, n)


def _normalized(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The normalised input of one of timm's norm + activation layers, without its affine part, and whether that
    affine part is per channel (dim 1) rather than over the trailing dims."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode: the running statistics
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps), True
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), True
    if any(c.__name__ == "LayerNormAct2d" for c in type(module).__mro__):  # (FSDP2 subclasses a unit's class)
        h = F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, None, None, module.eps)
        return h.permute(0, 3, 1, 2), True
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps), False


def _act_backward(act: nn.Module, z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``d`` passed back through the elementwise ``act`` at its input ``z``: torch's own backward op for the
    common activations, a vjp (on a copy: timm's activations work in place) for the rest."""
    t = type(act)
    if t in (nn.Identity, nn.Dropout):  # Dropout: the estimate runs in eval mode
        return d
    if t is nn.ReLU:
        return torch.ops.aten.threshold_backward(d, z, 0)
    if t is nn.ReLU6:
        return torch.ops.aten.hardtanh_backward(d, z, 0.0, 6.0)
    if t is nn.SiLU:
        return torch.ops.aten.silu_backward(d, z)
    if t is nn.GELU:
        return torch.ops.aten.gelu_backward(d, z, approximate=act.approximate)
    if t is nn.Hardswish:
        return torch.ops.aten.hardswish_backward(d, z)
    return torch.func.vjp(lambda v: act(v.clone()), z)[1](d)[0]


def _keep_affine(cap: _Capture) -> Callable:
    """A forward hook keeping a copy of the module's weight and bias (small: one value a channel) in ``cap``."""
    def hook(module, inputs, output):
        cap.affine = tuple(None if t is None else t.detach().clone() for t in (module.weight, module.bias))
    return hook


def _norm_act(module: nn.Module, xs, ds, want, n, affine: tuple | None = None):
    """timm's ``BatchNormAct2d``/``GroupNormAct``/``LayerNormAct(2d)``: ``act(drop(norm(x)))`` with an elementwise
    ``act`` and a ``drop`` that eval mode makes the identity (see :func:`_pointwise`), so the gradient at the
    norm's output is each sample's own: the output gradient passed back through ``act`` at the recomputed norm
    output, then the norm's closed form (for a BatchNorm or GroupNorm, the one-pass sums of
    :func:`_normalized_channel_sums` on that gradient). ``affine``: the weight and bias the forward read (the
    module's own by default; under FSDP2 they are shards again by the time the rule runs)."""
    weight, bias = (module.weight, module.bias) if affine is None else affine
    stats = _channel_stats(module, xs, n)
    if stats is not None:
        def norm(x):  # the norm's output, affine part included, in the input's (widened) dtype
            w, b = (None if t is None else t.to(x.dtype) for t in (weight, bias))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                return F.batch_norm(x, module.running_mean.to(x.dtype), module.running_var.to(x.dtype), w, b,
                                    False, 0.0, module.eps)
            return F.group_norm(x, module.num_groups, w, b, module.eps)

        inner = [_act_backward(module.act, norm(x), d) for x, d in zip(xs, ds)]
        return _normalized_channel_sums(xs, inner, stats, module.eps, want, n)
    hats, inner = [], []
    for x, d in zip(xs, ds):
        h, channels = _normalized(module, x)
        w, b = weight, bias
        if channels:  # (C,) over dim 1; a LayerNorm's own shape broadcasts over the trailing dims as it is
            view = (1, -1) + (1,) * (h.dim() - 2)
            w, b = (None if t is None else t.reshape(view) for t in (w, b))
        z = h if w is None else h * w
        hats.append(h)
        inner.append(_act_backward(module.act, z if b is None else z + b, d))
    if channels:
        return _channel_affine(hats, inner, want, n)
    return _trailing_affine(hats, inner, tuple(module.normalized_shape), want, n)


#: parameter-free modules that act on each element alone (dropout: the estimate runs in eval mode)
_POINTWISE = (nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
              nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus)


def _pointwise(module: nn.Module) -> bool:
    """torch's elementwise activations, Identity and Dropout; timm's own activations without parameters."""
    if type(module) in _POINTWISE:
        return True
    return (type(module).__module__.startswith("timm.layers.activations")
            and next(module.parameters(), None) is None)


def _timm_norm_act(module: nn.Module):
    """The rule for one of timm's norm + activation layers (``timm.layers.norm_act``), or None."""
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if getattr(module, "_fast_norm", False) or type(drop) not in (nn.Identity, nn.Dropout) or not _pointwise(act):
        return None
    name = type(module).__name__
    if name == "BatchNormAct2d":
        return (_norm_act, 4) if module.track_running_stats and module.running_mean is not None else None
    if name in ("GroupNormAct", "GroupNorm1Act"):
        return _norm_act, 2
    if name == "LayerNormAct":
        return _norm_act, 1 + len(module.normalized_shape)
    if name == "LayerNormAct2d" and len(module.normalized_shape) == 1:
        return _norm_act, 4
    return None


def _known(module: nn.Module, module_prefix: str, name: str) -> bool:
    t = type(module)
    return t.__name__ == name and t.__module__.startswith(module_prefix)


_STD_CONVS = ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")


def _rule_for(module: nn.Module):
    """The rule for this module, or None; exact types only (a subclass may compute something else; an ``nn.Embedding``
    subclass is read at its lookups, :func:`_hook_layer`), and a few
    subclasses known to compute the same (timm's LayerNorm, RmsNorm, GroupNorm and GroupNorm1; timm's, torchvision's and
    smp's LayerNorm2d, smp's Mix Transformer LayerNorm and HF ConvNext's LayerNorm over the channels), a norm
    followed by an elementwise activation (timm's BatchNormAct2d and its kin), a convolution that pads its input
    itself (smp's and timm's "SAME"), timm's weight-standardised convolutions, torchvision's video ResNets' Conv3d
    subclasses (which only add a static method), a transposed convolution or a transposed Linear (transformers'
    Conv1D). A third element, where there is one, names the module's parameters
    the rule covers (else its weight and bias)."""
    t = type(module)
    if t is nn.Linear:
        return _linear, 2
    if _known(module, "transformers.pytorch_utils", "Conv1D"):
        return _transposed_linear, 2
    if _known(module, "timm.layers.norm", "LayerNorm"):
        return _layernorm, 1 + len(module.normalized_shape)
    if ((_known(module, "timm.layers.norm", "LayerNorm2d") or _known(module, "torchvision.models", "LayerNorm2d")
         or _known(module, "segmentation_models_pytorch.decoders", "LayerNorm2d"))
            and len(module.normalized_shape) == 1):
        return _layernorm2d, 3
    if _known(module, "segmentation_models_pytorch.encoders.mix_transformer", "LayerNorm"):
        return (_smp_layernorm, 3) if len(module.normalized_shape) == 1 else None
    if _known(module, "timm.layers.norm", "GroupNorm") or _known(module, "timm.layers.norm", "GroupNorm1"):
        return _groupnorm, 2
    if any(_known(module, "transformers.models.convnext", c) for c in ("ConvNextLayerNorm", "ConvNextV2LayerNorm")):
        if getattr(module, "data_format", None) == "channels_first" and len(module.normalized_shape) == 1:
            return _layernorm2d, 3  # HF ConvNext: its LayerNorm over the channels of NCHW
        return (_layernorm, 1 + len(module.normalized_shape)) if module.data_format == "channels_last" else None
    if t.__module__.startswith("timm.layers.norm_act"):
        return _timm_norm_act(module)
    if ((_known(module, "segmentation_models_pytorch.encoders._efficientnet", "Conv2dStaticSamePadding")
         and type(module.static_padding) in (nn.ZeroPad2d, nn.Identity))
            or _known(module, "timm.layers.conv2d_same", "Conv2dSame")):
        return (_padded_conv, 4) if module.padding_mode == "zeros" and conv_padding(module) == (0, 0) else None
    if any(_known(module, "timm.layers.std_conv", c) for c in _STD_CONVS):
        if module.padding_mode != "zeros" or conv_padding(module) is None or hasattr(module.weight, "to_local"):
            return None  # (under FSDP2 the weight the standardisation reads is a shard)
        return _std_conv, 4, ("weight", "bias", "gain")
    if plain_conv(module):
        return _conv, module.weight.dim()
    if t in _TRANSPOSED:
        return (_conv_transpose, module.weight.dim()) if module.padding_mode == "zeros" else None
    if isinstance(module, nn.Embedding):  # a subclass too: its lookups are what the rule reads (_hook_layer)
        return (_embedding, 1) if module.max_norm is None and not module.scale_grad_by_freq else None
    if t is nn.LayerNorm:
        return _layernorm, 1 + len(module.normalized_shape)
    if t is nn.RMSNorm or _known(module, "timm.layers.norm", "RmsNorm"):
        return _rmsnorm, 1 + len(module.normalized_shape)
    if t is nn.GroupNorm:
        return _groupnorm, 2
    if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if not (module.track_running_stats and module.running_mean is not None):
            return None  # normalises by the batch's statistics: samples interact
        return _batchnorm, 2
    return None


#: rules that treat every dim but the first (samples) and the features as positions
_TOKENWISE = (_linear, _transposed_linear, _layernorm, _rmsnorm, _embedding, _conv, _conv_transpose, _std_conv)
#: rules that take a sample's rows of dim 0 (windows, tokens flattened into it) flat, one sample's after another
_FLAT_ROWS = (_batchnorm,)
#: token-wise rules that also read a layer whose samples are on dim 1 (a ``batch_first=False`` transformer), the
#: steps transposed to dim 1
_SEQ_FIRST = (_linear, _transposed_linear, _layernorm, _rmsnorm, _embedding)


@dataclass
class _Layer:
    module: nn.Module
    rule: Callable
    min_dim: int
    attrs: dict[str, str]  # attribute ("weight"/"bias") -> candidate name


@dataclass
class _Capture:
    """One rule layer's calls in one forward: inputs and output gradients, with version stamps."""

    inputs: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    versions: list = field(default_factory=list)
    bad: bool = False
    group: int = 1  # rows of dim 0 per sample (windows), read as more tokens
    expanded: bool = False  # shared by the batch (dim 0 of 1): given a copy per sample
    seq_first: list = field(default_factory=list)  # per call: the samples were on dim 1 (captured transposed)
    affine: tuple | None = None  # a norm + activation layer's (weight, bias) as its forward read them


_EMBEDDING = inspect.signature(F.embedding)


class _Lookups(TorchFunctionMode):
    """Active inside the forward of an ``nn.Embedding`` subclass: each ``F.embedding`` of the module's own weight goes
    to ``hook`` as a forward hook of a plain ``nn.Embedding`` would see it (``(ids,)`` and the looked-up rows), and
    what ``hook`` returns replaces those rows. A lookup with other options than the module's goes without its ids
    (the hook marks the layer for the fallback)."""

    def __init__(self, module: nn.Embedding, hook: Callable):
        super().__init__()
        self.module, self.hook = module, hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.embedding:
            call = _EMBEDDING.bind(*args, **(kwargs or {})).arguments
            weight = call["weight"]
            if weight is self.module.weight:
                pad = call.get("padding_idx")
                pad = weight.shape[0] + pad if pad is not None and pad < 0 else pad
                plain = (pad == self.module.padding_idx and call.get("max_norm") is None
                         and not call.get("scale_grad_by_freq", False))
                new = self.hook(self.module, (call["input"],) if plain else (), out)
                out = out if new is None else new
        return out


class _Repeats(TorchFunctionMode):
    """Active during the batched forward: a ``repeat`` (or ``tile``) of an output the engine gave a copy per sample
    (``n`` rows where the model made one), or of what is computed from such copies alone, repeats each copy in its
    own row rather than ``n`` times. XCiT repeats its positional encoding for the batch; peft's prompt tuning and
    p-tuning, their prompts (one sample's, through an MLP in p-tuning, then repeated). A model whose values this
    changes fails the check of the losses, and its copies are refused."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.copies = n, {}  # id -> tensor

    def add(self, t: torch.Tensor) -> None:
        self.copies[id(t)] = t

    def _copy(self, t: Any) -> bool:
        return self.copies.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.copies:
            return func(*args, **kwargs)
        if func in _REPEATS and args and not kwargs and self._copy(args[0]):
            sizes = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if len(sizes) == args[0].dim() and sizes[0] == self.n:  # (n, …) of one row, as the copies hold it
                args = (args[0], (1, *sizes[1:]))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == self.n:
            flat = [u for a in (*args, *kwargs.values()) for u in (a if isinstance(a, (tuple, list)) else (a,))]
            tensors = [t for t in flat if isinstance(t, torch.Tensor)]
            # computed from copies, parameters and tensors without the batch's rows only: one sample's, copied
            if any(self._copy(t) for t in tensors) and all(
                    self._copy(t) or isinstance(t, nn.Parameter) or not t.dim() or t.shape[0] != self.n
                    for t in tensors):
                self.add(out)
        return out


_REPEATS = (torch.Tensor.repeat, torch.Tensor.tile, torch.tile)


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _hook_layer(module: nn.Module, hook: Callable) -> Any:
    """``module.register_forward_hook(hook)``; for an ``nn.Embedding`` subclass, the same hook on each lookup of its
    weight inside its forward (:class:`_Lookups`). BART's, Gemma's or M2M100's token embeddings scale the looked-up
    rows, BART's and OPT's learned positions compute the ids they look up: the rule needs the lookup itself."""
    if type(module) is nn.Embedding or not isinstance(module, nn.Embedding):
        return module.register_forward_hook(hook)
    modes: list[_Lookups] = []

    def enter(mod, args):
        modes.append(_Lookups(mod, hook))
        modes[-1].__enter__()

    def leave(mod, args, output):
        modes.pop().__exit__(None, None, None)

    return _Handles(module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True))


def find_layers(model: nn.Module, names: list[str]) -> dict[str, _Layer]:
    """Rule layers holding candidates: ``module name -> _Layer``. A tied parameter (GPT-2's LM head and token
    embedding) is kept when every module holding it has a rule: its per-sample gradients are summed across
    them before squaring; held also by a module without rule, it is left to the fallback."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    # distinct modules: one module reached by several paths (timm CoaT's ConvPosEnc, shared by its serial blocks)
    # holds its parameters once, and its one hook sees every call
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    wanted = set(names)
    found, held = {}, Counter()
    for mod_name, module in model.named_modules():
        rule = _rule_for(module)
        if rule is None:
            continue
        attrs = {}
        for attr in rule[2] if len(rule) > 2 else ("weight", "bias"):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and canonical.get(id(p)) in wanted and p is module._parameters.get(attr):
                attrs[attr] = canonical[id(p)]
                held[id(p)] += 1
        if attrs:
            found[mod_name] = _Layer(module, rule[0], rule[1], attrs)
    params = dict(model.named_parameters())
    for layer in found.values():
        layer.attrs = {a: n for a, n in layer.attrs.items() if held[id(params[n])] == owners[id(params[n])]}
    return {name: layer for name, layer in found.items() if layer.attrs}


# -- per-sample losses from one batched forward --------------------------------------------------------------

def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """Each sample's own mean cross-entropy (over its positions, ignoring -100), as a batch of one gives."""
    el = F.cross_entropy(logits, target, reduction="none").reshape(n, -1)
    if target.is_floating_point():  # class probabilities
        return el.mean(1)
    valid = (target != -100).reshape(n, -1).sum(1)
    return el.sum(1) / valid


def _span_loss(start: torch.Tensor, end: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor,
               n: int) -> torch.Tensor:
    """Extractive question answering's loss per sample, as HF writes it for a batch of one: the mean of the start's and
    the end's cross-entropies, positions clamped to the sequence length and that one ignored (a sample alone whose
    answer lies outside has a loss of NaN, the mean over no position)."""
    t = start.shape[1]

    def ce(logits, positions):
        positions = positions.reshape(n).clamp(0, t)
        el = F.cross_entropy(logits, positions, ignore_index=t, reduction="none")
        return torch.where(positions == t, torch.nan, el)

    return (ce(start, start_positions) + ce(end, end_positions)) / 2


def _hf_forms(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, n: int) -> dict[str, Callable]:
    """Candidate per-sample forms of an HF model's own loss (which one the model uses is checked on a sample)."""
    forms: dict[str, Callable] = {}
    if not labels.is_floating_point() and logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        if labels.dim() >= 2:  # token losses; transformers upcasts their logits to float32
            forms["causal_lm"] = lambda: _cross_entropy(logits[:, :-1].float().movedim(-1, 1), labels[:, 1:], n)
            forms["token"] = lambda: _cross_entropy(logits.float().movedim(-1, 1), labels, n)
        else:
            forms["classification"] = lambda: _cross_entropy(logits, labels, n)
    if logits.dim() == 2 and logits.shape[1] == 1 and labels.numel() == n:
        forms["regression"] = lambda: (logits.reshape(n) - labels.reshape(n).to(logits.dtype)).square()
    if labels.is_floating_point() and labels.shape == logits.shape:
        forms["multi_label"] = lambda: F.binary_cross_entropy_with_logits(
            logits, labels, reduction="none").reshape(n, -1).mean(1)
    return forms


def _ctc_forms(model: nn.Module, logits: torch.Tensor, batch: Mapping, n: int) -> dict[str, Callable]:
    """The per-sample form of an HF speech model's CTC loss (wav2vec2, HuBERT, WavLM: ``ctc_loss_reduction`` in the
    config): each sample's loss over its own frames, divided by its target's length under ``"mean"``; the
    log-probabilities in float32, as the model takes them."""
    config = getattr(model, "config", None)
    reduction = getattr(config, "ctc_loss_reduction", None)
    lengths_of = getattr(model, "_get_feat_extract_output_lengths", None)
    if reduction not in ("mean", "sum") or lengths_of is None or logits.dim() != 3 or batch["labels"].dim() != 2:
        return {}

    def form():
        mask, labels = batch.get("attention_mask"), batch["labels"]
        frames = mask.sum(-1) if mask is not None else torch.full((n,), batch["input_values"].shape[-1])
        keep = (labels != -100) & (labels != config.pad_token_id)
        targets = keep.sum(-1)
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
        el = F.ctc_loss(log_probs, labels.masked_select(keep), lengths_of(frames).to(torch.long), targets,
                        blank=config.pad_token_id, reduction="none", zero_infinity=config.ctc_zero_infinity)
        return el / targets.clamp(min=1) if reduction == "mean" else el

    return {"ctc": form}


class _Forward(nn.Module):
    """The user's forward as a module, so that ``functional_call`` can swap parameters under it."""

    def __init__(self, model: nn.Module, reader: BatchReader):
        super().__init__()
        self.model = model
        self.reader = reader

    def forward(self, batch: Any) -> Any:
        return self.reader.run(self.model, batch)


# -- what the one-time checks decided, kept per model ----------------------------------------------------------

# the engine's attributes that its one-time checks set (each check runs once, on the first chunk it needs)
_DECISIONS = ("_separable", "_expand_ok", "_expand_off", "_loss_form", "_clone", "_whole_model_fallback",
              "_fallback_reason", "_local_checked", "_no_local", "_batch_first", "_not_batch_first",
              "_seq_first_checked", "_not_seq_first", "_rooted", "_not_elementwise", "_lifted")
_DECIDED: "weakref.WeakKeyDictionary[nn.Module, tuple[_Signature, dict]]" = weakref.WeakKeyDictionary()
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _plain_attrs(module: nn.Module) -> tuple:
    """A module's own settings (stride, eps, p, a flag its forward reads): attributes of plain types."""
    out = []
    for k, v in module.__dict__.items():
        if k.startswith("_"):
            continue
        if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
            out.append((k, v))
    return tuple(out)


class _Signature:
    """What the checks' decisions depend on: the module tree (each module's identity, type, settings, hooks
    and any per-instance ``forward``), every parameter and buffer (identity, shape, dtype, device,
    requires_grad), an HF model's config, the loss and forward functions, the candidates, the engine and
    its fallbacks, autocast, the global module hooks, and the batch's structure (keys, dtypes, ranks).
    Objects are compared by identity and held weakly (an entry never keeps a model alive); one that cannot
    be held weakly makes the signature unusable (:meth:`of` gives None: nothing is cached)."""

    def __init__(self, plain: tuple, refs: list):
        self.plain = plain
        self.refs = refs

    @classmethod
    def of(cls, engine: "HooksEngine", batch: Any) -> "_Signature | None":
        model, reader = engine.model, engine.reader
        plain: list = [type(engine), engine._make_fallback, engine._make_last_resort, tuple(engine.names)]
        objs: list = []
        for name, m in model.named_modules(remove_duplicate=False):
            objs.append(m)
            plain.append((name, type(m), _plain_attrs(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                          tuple(m._backward_hooks), tuple(m._backward_pre_hooks), tuple(m._state_dict_hooks),
                          "forward" in m.__dict__))
            if "forward" in m.__dict__:
                objs.append(m.__dict__["forward"])
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            objs.append(t)
            plain.append((name, tuple(t.shape), t.dtype, t.device, t.requires_grad, isinstance(t, nn.Parameter)))
        config = getattr(model, "config", None)
        if config is not None:
            try:
                if hasattr(config, "to_json_string"):  # transformers
                    plain.append(config.to_json_string(use_diff=False))
                else:  # a dict (huggingface_hub's mixin: segmentation_models_pytorch) or a plain object
                    plain.append(json.dumps(config if isinstance(config, Mapping) else vars(config),
                                            sort_keys=True, default=repr))
            except Exception:  # noqa: BLE001 (a config that cannot be written out: decide afresh)
                return None
        for fn in (reader.loss_fn, reader.forward_fn):
            plain.append(fn is None)
            if fn is not None:
                objs.append(fn)
        g = torch.nn.modules.module
        plain.append(tuple(tuple(getattr(g, h, {})) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                              "_global_backward_hooks", "_global_backward_pre_hooks")))
        plain.append(tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")))
        leaves, spec = pytree.tree_flatten(batch)
        plain.append(str(spec))
        plain.append(tuple((x.dtype, x.dim(), x.device) if isinstance(x, torch.Tensor) else type(x) for x in leaves))
        try:
            refs = [weakref.ref(o) for o in objs]
        except TypeError:  # a bound method made on access, a callable object without weakref support
            return None
        return cls(tuple(plain), refs)

    def matches(self, other: "_Signature") -> bool:
        return (self.plain == other.plain and len(self.refs) == len(other.refs)
                and all(a() is not None and a() is b() for a, b in zip(self.refs, other.refs)))


def forget(model: nn.Module) -> None:
    """Drop what the hooks engine's one-time checks decided for ``model`` (they run again on the next call)."""
    _DECIDED.pop(model, None)


class _NoPerSampleLoss(Exception):
    """The model's own loss could not be written per sample: the caller falls back."""


class HooksEngine:
    """Per-sample gradients of the candidates (as :class:`LazyGrads` where a rule applies) for a chunk.

    Args:
        model: the model (in eval mode while the engine runs).
        names: candidate parameter names.
        reader: the batch reader (forward, loss, slicing).
        fallback: ``engine_class(model, names, reader)`` for the candidates no rule covers (vmap).
        last_resort: the same, used where ``fallback`` raises (the batch-of-one loop).
    """

    name = "hooks"

    def __init__(self, model: nn.Module, names: list[str], reader: BatchReader, fallback: Callable,
                 last_resort: Callable):
        self.model = model
        self.names = names
        self.reader = reader
        self.layers = find_layers(model, names)
        self.params = dict(model.named_parameters())
        ruled = {pname for layer in self.layers.values() for pname in layer.attrs.values()}
        # a module without rule holding candidates of its own (nn.MultiheadAttention, a layer scale), with the
        # candidates of its submodules that no rule covers (MultiheadAttention reads its out_proj's weight
        # without running out_proj): its inputs and output gradients are captured like a rule layer's, and
        # torch.func forms each sample's gradient of that module alone (checked against the loop once)
        owners = Counter(id(p) for m in model.modules(remove_duplicate=False) for p in m.parameters(recurse=False))
        wanted = set(names)
        self.local: dict[str, tuple[nn.Module, dict[str, str]]] = {}
        claimed = set(ruled)

        def free(full: str, p: torch.Tensor) -> bool:
            return full in wanted and full not in claimed and owners[id(p)] == 1 and self.params.get(full) is p

        # deepest first: a module's own candidates take its local gradient, not an ancestor's (torchvision's ViT
        # Encoder holds pos_embedding beside its attention layers: it would have run them all per sample)
        for mod_name, module in reversed(list(model.named_modules())):
            if module is model or not any(free(f"{mod_name}.{a}", p) for a, p in module.named_parameters(recurse=False)):
                continue
            own = {rel: f"{mod_name}.{rel}" for rel, p in module.named_parameters() if free(f"{mod_name}.{rel}", p)}
            claimed.update(own.values())
            self.local[mod_name] = (module, own)
        local_names = {pname for _, own in self.local.values() for pname in own.values()}
        self._local_checked: set[str] = set()
        self._no_local: set[str] = set()
        # local candidates used otherwise than multiplied or added into a batched tensor (elementwise.py)
        self._not_elementwise: set[str] = set()
        # rule layers whose dim 0 was checked to be (or not to be) the samples' dimension
        self._batch_first: set[str] = set()
        self._not_batch_first: set[str] = set()
        self._seq_first_checked: set[str] = set()  # ... checked as captured from dim 1 (samples on dim 1)
        # ... whose dim 1 had the chunk's size by chance and did not hold the samples (windows of as many tokens
        # as samples): read from dim 0 from then on
        self._not_seq_first: set[str] = set()
        self._read_dim1 = True  # capture token-wise layers whose samples are on dim 1 (off under FSDP2)
        self._rooted: set[str] = set()  # rule layers given a root of their own (found unreached once)
        self._lifted: list[str] = []  # local modules whose candidates went to their parent (see _lift), in order
        # parameters of the top module shaped like a batch of one (pos_embed (1, T, D), cls_token, an offset
        # (1, C, 1, 1)) that the model broadcasts against the batch: given a copy per sample, autograd returns
        # each sample's gradient in the same backward (checked once against the losses and the loop)
        self.expandable = [n for n in names if n not in ruled and n not in local_names and self.params[n].dim() >= 2
                           and self.params[n].shape[0] == 1]
        self._forward_module = _Forward(model, reader)
        self._slots = tensor_slots(self._forward_module)
        self._swap: dict[str, torch.Tensor] | None = None
        # one buffer for the per-sample gradient blocks of every layer and chunk (each block is squared before
        # the next is formed): kept for the engine's life, so its pages are faulted in once
        self._scratch = Scratch()
        self._make_fallback = fallback
        self._make_last_resort = last_resort
        self._fallbacks: dict[frozenset, Any] = {}
        self._clone = False  # set once a captured tensor was seen modified in place
        # batch-shared outputs (by rule layer or local module) and parameters given a copy per sample: checked to hold
        # (ok) or refused (off), each on its own once several failed together
        self._expand_ok: set[str] = set()
        self._expand_off: set[str] = set()
        self._loss_form: str | None = None
        self._whole_model_fallback = False
        self._separable = False  # checked once: the batched forward gives each sample the loss it gives alone
        self._fallback_reason = ""
        # the checks' decisions are kept per model, for the next call with the same signature (_Signature)
        self._signature: _Signature | None = None
        self._signed = False

    # -- the engine ---------------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> dict[str, Any]:
        n = self.reader.size(batch)
        grads: dict[str, Any] = {}
        if not self._signed:
            self._adopt(batch)
        if (self.layers or self.expandable or self.local) and not self._whole_model_fallback:
            try:
                grads = self._per_layer(batch, n)
            except _NoPerSampleLoss as exc:
                self._whole_model_fallback, self._fallback_reason = True, str(exc)
                self._warn_whole_model()
                grads = {}
            self._remember()
        rest = [name for name in self.names if name not in grads]
        self.fallen_back = rest  # the candidates of this chunk that no rule covered (for tests and reports)
        if rest:
            grads.update(self._fallback(rest, batch))
        return {name: grads[name] for name in self.names}

    def _warn_whole_model(self) -> None:
        warnings.warn(f"gradsel.fisher(engine='hooks'): {self._fallback_reason}; the vmap engine computes every "
                      "candidate instead (slower). Pass loss= (one sample's loss) to use the hooks engine.",
                      RuntimeWarning, stacklevel=5)

    def _adopt(self, batch: Any) -> None:
        """On the first chunk: take the decisions of an earlier call on the same model and signature."""
        self._signed = True
        self._signature = _Signature.of(self, batch)
        entry = _DECIDED.get(self.model)
        if self._signature is None or entry is None or not entry[0].matches(self._signature):
            return
        for k, v in entry[1].items():
            setattr(self, k, copy.copy(v))
        for name in self._lifted:
            self._lift(name)
        if self._whole_model_fallback:
            self._warn_whole_model()

    def _remember(self) -> None:
        if self._signature is not None:
            _DECIDED[self.model] = (self._signature, {k: copy.copy(getattr(self, k)) for k in _DECISIONS})

    def _fallback(self, names: list[str], batch: Any) -> dict[str, Any]:
        key = frozenset(names)
        run = self._fallbacks.get(key)
        if run is None:
            run = self._fallbacks[key] = self._make_fallback(self.model, names, self.reader)
        try:
            return run(batch)
        except GradselError:
            raise
        except Exception as exc:
            if isinstance(run, self._make_last_resort):
                raise
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"gradsel.fisher(engine='hooks'): {len(names)} parameter(s) without a per-layer rule "
                          f"(e.g. {names[0]!r}) need the vmap engine, which cannot run {type(self.model).__name__} "
                          f"({type(exc).__name__}: {reason}); the batch-of-one loop computes them instead.",
                          RuntimeWarning, stacklevel=4)
            run = self._fallbacks[key] = self._make_last_resort(self.model, names, self.reader)
            return run(batch)

    def _per_layer(self, batch: Any, n: int) -> dict[str, Any]:
        caps = {name: _Capture() for name in self.layers}
        roots: list[torch.Tensor] = []
        recording = [True]
        clone, off = self._clone, set(self._expand_off) if n > 1 else None
        expanded: set[str] = set()  # the rule layers and local modules whose shared outputs were expanded
        repeats = _Repeats(n)  # and those outputs, as the model got them

        def forward_hook(name: str, layer: _Layer):
            cap = caps[name]

            def hook(module, inputs, output):
                # ignore a recomputation (activation checkpointing) and forwards without autograd
                if not recording[0] or not torch.is_grad_enabled():
                    return None
                x = inputs[0] if inputs else None
                if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor) or x.dim() < layer.min_dim:
                    cap.bad = True
                    return None
                new, copied = None, False
                if off is not None and name not in off and x.shape[0] == 1 and output.shape[0] == 1:
                    # shared by the batch (position embeddings of shape (1, T, D)): its δ would be a sum over
                    # samples; expanded, each sample gets its own copy and its own δ (checked below)
                    x, output = x.expand(n, *x.shape[1:]), output.expand(n, *output.shape[1:])
                    new, copied = output, True
                    cap.expanded = True
                    expanded.add(name)
                # the samples on dim 1 and the steps on dim 0 (torch's batch_first=False transformers): captured with
                # the two transposed, checked below as batch-first layers are
                seq_first = (self._read_dim1 and name not in self._not_seq_first and x.shape[0] != n
                             and x.dim() >= 2 and output.dim() >= 3
                             and x.shape[1] == n and output.shape[1] == n and layer.rule in _SEQ_FIRST)
                if cap.seq_first and cap.seq_first[0] != seq_first:  # called in both layouts: the fallback
                    cap.bad = True
                    return None
                if seq_first:
                    x = x.transpose(0, 1)
                group = x.shape[0] // n
                if x.shape[0] != n or output.shape[1 if seq_first else 0] != n:
                    # windows (Swin, MaxViT): dim 0 holds each sample's rows one after another; a token-wise
                    # rule reads them as more tokens of that sample (checked below, as batch-first layers are)
                    if not (layer.rule in _TOKENWISE + _FLAT_ROWS and group > 1
                            and x.shape[0] == output.shape[0] == n * group):
                        cap.bad = True
                        return None
                    x = x.reshape(n, group, *x.shape[1:])
                    cap.group = group
                if not x.requires_grad or not output.requires_grad or name in self._rooted:
                    # nothing upstream of this layer reaches a root: start one here (an output not reached
                    # by the backward is found below and left to the fallback)
                    root = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                    roots.append(root)
                    output = new = output + root
                if copied:  # as the model gets it (with its root)
                    repeats.add(new)
                x = x.detach()
                k = len(cap.inputs)
                cap.inputs.append(x.clone() if clone else x)
                cap.versions.append(x._version)
                cap.shapes.append(output.transpose(0, 1).shape if seq_first else output.shape)
                cap.grads.append(None)
                cap.seq_first.append(seq_first)

                def keep(g, k=k, group=group):
                    g = g.reshape(n, group, *g.shape[1:]) if group > 1 else g.transpose(0, 1) if seq_first else g
                    cap.grads[k] = (g.clone() if clone else g, g._version)

                output.register_hook(keep)
                return new

            return hook

        lcalls: dict[str, list] = {name: [] for name in self.local}

        def local_hook(name: str):
            def hook(module, args, kwargs, output):
                if not recording[0] or not torch.is_grad_enabled():
                    return None
                flat, spec = pytree.tree_flatten((args, kwargs))
                outs, out_spec = pytree.tree_flatten(output)
                x = _seq_first_input(module, args, kwargs)
                if x is not None:
                    return self._seq_first_call(lcalls[name], x.shape[1] == n, flat, spec, outs, out_spec, roots)
                # a batch-first RNN's final states (layers·directions, n, H) hold the samples on dim 1: not shared by
                # the batch, not to be expanded; their gradients are kept beside the sequence's (_rnn_grads)
                states = isinstance(module, nn.RNNBase) and module.batch_first
                expand = off is not None and name not in off
                rows = {t.shape[0] for j, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point()
                        and t.dim() and not (expand and t.shape[0] == 1) and not (states and j)}
                # windows: every output holds the same multiple of n rows, each sample's one after another;
                # the module then runs on each sample's group of rows (checked against the loop below)
                only = rows.pop() if len(rows) == 1 else n
                group = only // n if only != n and only % n == 0 else 1
                batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n * group for t in flat]
                out_batched = [isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
                               and t.shape[0] == n * group for t in outs]
                if not any(out_batched) or not any(batched):
                    # no batch dimension to split (an output of the batch's size without a batched input, such as
                    # a bias of as many heads as samples, is one shared by all): its parent takes it, or the fallback
                    lcalls[name].append(None)
                    return None
                shared = [expand and group == 1 and not b and isinstance(t, torch.Tensor) and t.is_floating_point()
                          and t.dim() > 0 and t.shape[0] == 1 and t.requires_grad and not (states and j)
                          for j, (t, b) in enumerate(zip(outs, out_batched))]
                if any(shared):
                    # an output shared by the batch (T5's position bias (1, heads, q, k), which every later layer
                    # adds to its scores): its gradient would be a sum over samples; expanded, each sample's row
                    # gets its own (checked below with the other expansions, and the local gradient against the loop)
                    outs = [t.expand(n, *t.shape[1:]) if e else t for t, e in zip(outs, shared)]
                    out_batched = [b or e for b, e in zip(out_batched, shared)]
                    expanded.add(name)
                kept = [b or (states and j > 0 and isinstance(t, torch.Tensor) and t.requires_grad)
                        for j, (t, b) in enumerate(zip(outs, out_batched))]  # the outputs whose gradients are kept
                if any(shared) or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):
                    # a root: the backward to the other roots need not pass through this module
                    root = torch.zeros((), dtype=outs[out_batched.index(True)].dtype, device=outs[0].device,
                                       requires_grad=True)
                    roots.append(root)
                    outs = [t + root if k else t for t, k in zip(outs, kept)]
                    for t in (t for t, e in zip(outs, shared) if e):
                        repeats.add(t)
                elif sum(out_batched) > 1:
                    # new nodes (views) as the outputs, so that their gradients come from outside the module only:
                    # T5's attention returns its softmax, which it also reads to weigh the values. Not for a single
                    # output: a view written in place later (timm NF-ResNet's in-place activation after its conv)
                    # loses the hook registered on it
                    outs = [t.view_as(t) if b and t.requires_grad else t for t, b in zip(outs, out_batched)]
                call = {"flat": [t.detach() if isinstance(t, torch.Tensor) else t for t in flat], "spec": spec,
                        "batched": batched, "out_batched": out_batched, "group": group,
                        "shapes": [t.shape if b else None for t, b in zip(outs, out_batched)],
                        "grads": [None] * len(outs)}
                lcalls[name].append(call)
                for j, (t, k) in enumerate(zip(outs, kept)):
                    if k and t.requires_grad:
                        t.register_hook(lambda g, j=j, call=call: call["grads"].__setitem__(j, g))
                return pytree.tree_unflatten(outs, out_spec)

            return hook

        leaves = {}
        for pname in self.expandable:
            if pname not in self._expand_off:
                p = self.params[pname]
                leaves[pname] = p.detach().expand(n, *p.shape[1:]).clone().requires_grad_(True)
        handles = [_hook_layer(layer.module, forward_hook(name, layer)) for name, layer in self.layers.items()]
        # a norm + activation layer's rule recomputes the norm's output: its affine parameters as the forward read
        # them, taken before FSDP2's own forward hook (registered first) reshards a unit's parameters into DTensors
        handles += [layer.module.register_forward_hook(_keep_affine(caps[name]), prepend=True)
                    for name, layer in self.layers.items() if layer.rule is _norm_act]
        handles += [module.register_forward_hook(local_hook(name), with_kwargs=True)
                    for name, (module, _) in self.local.items()]
        retry = False
        try:
            self._swap = {"model." + k: v for k, v in leaves.items()} or None
            with norm_gradients_as_inputs(self.model, active=n == 1):  # torch's batch norm on one sample
                watched = {pname: self.params[pname] for _, own in self.local.values() for pname in own.values()
                           if pname not in self._not_elementwise and pname not in self._no_local}
                # a parameter refused a copy per sample may still be added or multiplied into batched rows (TNT's
                # pixel_pos into each sample's patches)
                watched.update({pname: self.params[pname] for pname in self.expandable
                                if pname in self._expand_off and pname not in self._not_elementwise})
                elementwise = ElementwiseUses(watched, n) if watched else None
                with elementwise or contextlib.nullcontext(), repeats if n > 1 else contextlib.nullcontext():
                    losses = self._losses(batch, n)
                recording[0] = False
                uses, opaque = _parameter_uses(losses)
                # (and those refused a copy: their adds may lie before every root, as TNT's pixel_pos does)
                targets = roots + list(leaves.values()) + [self.params[p] for p in watched if p in self._expand_off
                                                           and self.params[p].requires_grad]
                got = (torch.autograd.grad(losses.sum(), targets, allow_unused=True)
                       if targets and losses.requires_grad else [None] * len(targets))
        except Exception:
            if not (expanded or leaves):
                raise
            retry = True  # the model writes into a shared output, or cannot take a copy per sample
        finally:
            self._swap = None
            recording[0] = False
            for h in handles:
                h.remove()
        if retry:  # once this attempt's hooks are off the modules (left on, they expanded the retry's outputs)
            self._refuse_expansions(expanded | set(leaves), batch, n)
            return self._per_layer(batch, n)
        leaf_grads = {pname: (torch.zeros_like(leaves[pname]) if g is None else g).reshape(n, *self.params[pname].shape)
                      for pname, g in zip(leaves, got[len(roots):])}
        tried = expanded | set(leaves)
        if tried - self._expand_ok:
            failed = self._expansion_fails(batch, n, losses.detach(), leaf_grads, caps)
            if failed is not None:
                if failed:  # named by their own checks: refused, and the others checked again
                    self._expand_off |= failed
                else:
                    self._refuse_expansions(tried, batch, n)
                return self._per_layer(batch, n)
            self._expand_ok |= tried
        if not clone and _modified(caps):
            self._clone = True  # a captured input or gradient was written in place later: capture copies
            return self._per_layer(batch, n)
        # a layer whose input requires grad only through parameters without rule (BART's scaled token
        # embedding) lies on no path to a root: its output gradient never arrived; give it a root of its own
        unreached = {name for name, cap in caps.items() if cap.inputs and not cap.bad and name not in self._rooted
                     and any(g is None for g in cap.grads)}
        unchecked = [name for name, cap in caps.items() if n > 1 and cap.inputs and not cap.bad
                     and not self._checked(name, cap)]
        # a local module whose output has no sample dimension (HF Swin's relative-position bias: its table read
        # into one (heads, N, N) bias for every window), or that never runs while its parent reads its candidates
        # (timm MaxViT's attention passes rel_pos.get_bias() to SDPA as attn_mask): the parent takes them
        lift = [name for name, calls in lcalls.items() if "." in name and (
            any(c is None for c in calls)
            or (not calls and any(uses[id(self.params[p])] for p in self.local[name][1].values())))]
        # a rule layer that ran without a batch dimension (T5's relative-attention embedding looks up one bucket
        # table for all samples; its attention module returns the bias, which every layer adds to its scores):
        # its weights join its parent's local gradient, which reads each sample's gradient of that module's outputs
        lift += [name for name, cap in caps.items() if "." in name and cap.bad]
        rerun, check = self._agree([bool(unreached) or bool(lift), not self._separable or bool(unchecked)])
        if rerun:
            self._rooted |= unreached
            for name in lift:
                self._lift(name)
                self._lifted.append(name)
            return self._per_layer(batch, n)
        if check:
            self._check_samples(batch, n, losses.detach(), caps, unchecked)
            # a layer read from dim 1 whose samples were not there (a window of as many tokens as the chunk has
            # samples, dim 0 holding each sample's windows): read again from dim 0, and checked again so (never
            # under FSDP2, which reads no layer from dim 1: no flag to exchange)
            misread = [name for name in unchecked if name in self._not_batch_first and caps[name].seq_first[0]]
            if misread:
                self._not_seq_first.update(misread)
                self._not_batch_first.difference_update(misread)
                return self._per_layer(batch, n)
            # a layer whose dim 0 had the batch's size (or a multiple of it) by chance, found not to hold the
            # samples (T5's bucket table when the sequence is a multiple of the chunk): lifted as above
            late = [name for name in unchecked if "." in name and name in self._not_batch_first]
            if self._agree([bool(late)])[0]:
                for name in late:
                    self._lift(name)
                    self._lifted.append(name)
                return self._per_layer(batch, n)
        out: dict[str, Any] = dict(leaf_grads)
        calls: Counter = Counter()
        broken: set[str] = set()
        for name, layer in self.layers.items():
            cap = caps[name]
            for pname in layer.attrs.values():
                calls[pname] += len(cap.inputs)
                if cap.bad or name in self._not_batch_first or any(g is None for g in cap.grads):
                    # ran without a batch dimension (or with the samples on another one), or the backward did not
                    # reach its output (unused, or reached only through a parameter without rule): the fallback
                    broken.add(pname)
        self._adopt_read_weights(calls, uses)
        parts: dict[str, list] = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                cap = caps[name]
                # each call of a layer uses its parameter once in autograd's graph; another use (the weight read
                # directly elsewhere, a cast shared by calls under autocast) leaves it to the fallback
                want = {attr: pname for attr, pname in layer.attrs.items() if pname not in broken
                        and (not self.params[pname].requires_grad or uses[id(self.params[pname])] == calls[pname])}
                if not want or not cap.inputs:
                    continue
                xs, ds = _widened(cap.inputs, [g[0] for g in cap.grads])
                if cap.group > 1 and layer.rule in _FLAT_ROWS:
                    xs, ds = [x.flatten(0, 1) for x in xs], [d.flatten(0, 1) for d in ds]
                made = layer.rule(layer.module, xs, ds, want, n, **({} if cap.affine is None else
                                                                     {"affine": cap.affine}))
                for attr, g in made.items():
                    parts.setdefault(layer.attrs[attr], []).append(g)
        scales = {}
        if elementwise is not None:  # layer scales: from the batched forward, not a re-run of their module
            scales = elementwise.grads(self.params)
            self._not_elementwise |= elementwise.bad
        # a local candidate absent from the graph (wav2vec2's masked_spec_embed, read only by SpecAugment in training)
        # is a zero below, not a reason to re-run its module (the whole model there) per sample
        unused = set() if opaque else {p for p in self.names if uses[id(self.params[p])] == 0}
        out.update(self._local_grads(lcalls, batch, n, scales, unused))
        for pname, got_parts in parts.items():
            out[pname] = got_parts[0] if len(got_parts) == 1 else _summed(got_parts, n, self.params[pname])
            if isinstance(out[pname], (BlockGrads, ConvWeightGrads)):
                out[pname].scratch = self._scratch
        if not opaque:  # a candidate absent from the graph (a layer that never runs) has zero gradients
            for pname in self.names:
                p = self.params[pname]
                if pname not in out and p.requires_grad and uses[id(p)] == 0:
                    out[pname] = ZeroGrads(n)
        return out

    def _refuse_expansions(self, tried: set[str], batch: Any, n: int) -> None:
        """The expansions ``tried`` together failed (the forward raised, or :meth:`_expansion_fails` named none): one
        alone is refused; of several, each is tried in a pass of its own with the others refused, and those that hold
        are kept (timm's TNT adds ``pixel_pos`` to each sample's patches, rows that a copy per sample does not fit;
        its ``cls_token`` and ``patch_pos`` take copies per sample as a ViT's do)."""
        if len(tried) == 1:
            self._expand_off |= tried
            return
        before, good = set(self._expand_off), set()
        for name in sorted(tried):
            self._expand_off = before | (tried - {name})
            self._per_layer(batch, n)  # refuses ``name`` if it fails alone, else checks and keeps it
            if name not in self._expand_off:
                good.add(name)
        self._expand_off = before | (tried - good)

    def _expanded_outputs_failing(self, batch: Any, n: int, caps: dict[str, _Capture]) -> set[str]:
        """The expanded outputs whose gradient in row ``i`` is not the gradient that output gets on sample ``i``
        alone, for the first two samples. A model that reads its copies otherwise (HF Swinv2 flattens its
        position-bias MLP's output and indexes only the first copy's rows) would credit one sample with the
        whole batch's gradient, and the losses would not show it. Two forwards of one sample each, whatever
        they find (a chunk of one sample checks it twice), so that FSDP2's ranks stay in step."""
        failing = set()
        for i in (min(j, n - 1) for j in range(2 if caps else 0)):
            roots: dict[str, list] = {name: [] for name in caps}

            def keep(name):
                def hook(module, inputs, output):
                    root = torch.zeros_like(output, requires_grad=True)
                    roots[name].append(root)
                    return output + root
                return hook

            loss = self._loss_alone(batch, i, {name: keep(name) for name in caps})
            flat = [r for name in caps for r in roots[name]]
            alone = iter(torch.autograd.grad(loss, flat, allow_unused=True) if flat and loss.requires_grad
                         else [None] * len(flat))
            for name, cap in caps.items():
                got = [next(alone) for _ in roots[name]]
                holds = len(got) == len(cap.grads)
                for root, g, grad in zip(roots[name], got, cap.grads):
                    ref = torch.zeros_like(root) if g is None else g
                    mine = torch.zeros_like(ref) if grad is None else grad[0][i:i + 1].to(ref.dtype)
                    rtol = 1e-7 if ref.dtype == torch.float64 else 1e-3
                    holds = holds and mine.shape == ref.shape and torch.allclose(
                        mine, ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-30)
                if not holds:
                    failing.add(name)
        return failing

    def _loss_alone(self, batch: Any, i: int, hooks: dict[str, Callable]) -> torch.Tensor:
        """Sample ``i``'s loss as a batch of one, with ``hooks`` (rule layer name -> forward hook) on for it."""
        handles = [_hook_layer(self.layers[name].module, hook) for name, hook in hooks.items()]
        try:
            return self._losses(self.reader.take(batch, slice(i, i + 1)), 1)[0]
        finally:
            for h in handles:
                h.remove()

    def _lift(self, name: str) -> None:
        """The candidates of the local module or rule layer ``name`` join its parent's local gradient (the parent
        becomes local if it was not); checked against the loop with the rest, as every local gradient is."""
        if name in self.local:
            _, own = self.local.pop(name)
        elif name in self.layers:
            own = dict(self.layers.pop(name).attrs)
        else:
            return
        parent = name.rpartition(".")[0]
        module, theirs = self.local.get(parent) or (self.model.get_submodule(parent), {})
        theirs.update({f"{name[len(parent) + 1:]}.{attr}": pname for attr, pname in own.items()})
        self.local[parent] = (module, theirs)

    def _adopt_read_weights(self, calls: Counter, uses: Counter) -> None:
        """A rule layer whose module never ran while its weights were used: its parent reads them directly
        (torchvision's Swin passes ``self.qkv.weight`` to ``F.linear``). A module-local ancestor takes them
        into its own local gradient (checked against the loop with the rest); without one, the fallback."""
        for name, layer in list(self.layers.items()):
            read = {attr: pname for attr, pname in layer.attrs.items()
                    if calls[pname] == 0 and uses[id(self.params[pname])] > 0}
            owner = max((m for m in self.local if name.startswith(m + ".")), key=len, default=None)
            if not read or owner is None:
                continue
            for attr, pname in read.items():
                self.local[owner][1][f"{name[len(owner) + 1:]}.{attr}"] = pname
                del layer.attrs[attr]
            if not layer.attrs:
                del self.layers[name]

    @staticmethod
    def _seq_first_call(calls: list, batched: bool, flat: list, spec: Any, outs: list, out_spec: Any,
                        roots: list) -> Any:
        """A sequence-first LSTM, GRU, RNN or attention call (:func:`_seq_first_input`): its samples are on dim 1 of
        the inputs and the output sequence (and of an RNN's final states; dim 0 of attention weights). The call is
        kept with the gradients of every output, for :func:`_rnn_grads` (which reads it steps first) or
        :func:`_mha_grads` (batch first); a call whose dim 1 is not the batch (not ``batched``) is left
        to the fallback."""
        if not batched:
            calls.append(None)
            return None
        kept = [isinstance(t, torch.Tensor) and t.requires_grad for t in outs]
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat):  # a root, as in local_hook
            root = torch.zeros((), dtype=outs[0].dtype, device=outs[0].device, requires_grad=True)
            roots.append(root)
            outs = [t + root if k else t for t, k in zip(outs, kept)]
        call = {"flat": [t.detach() if isinstance(t, torch.Tensor) else t for t in flat], "spec": spec,
                "group": 1, "seq_first": True, "grads": [None] * len(outs)}
        calls.append(call)
        for j, (t, k) in enumerate(zip(outs, kept)):
            if k:
                t.register_hook(lambda g, j=j: call["grads"].__setitem__(j, g))
        return pytree.tree_unflatten(outs, out_spec)

    def _local_grads(self, lcalls: dict[str, list], batch: Any, n: int, scales: dict[str, torch.Tensor],
                     unused: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Each sample's gradient of the local modules' own candidates: ``scales`` (layer scales found in the
        batched forward: elementwise.py), ``nn.MultiheadAttention`` from a batched recomputation
        (:func:`_mha_grads`), else torch.func on that module alone, fed with the captured inputs and output
        gradients (calls summed); checked once against the loop. The ``unused`` candidates (not in autograd's
        graph: zeros, set by the caller) are left out."""
        out: dict[str, torch.Tensor] = dict(scales)
        for name, (module, own) in self.local.items():
            calls = lcalls[name]
            own = {attr: pname for attr, pname in own.items()
                   if pname not in self._no_local and pname not in out and pname not in unused}
            if not calls or not own or any(c is None or all(g is None for g in c["grads"]) for c in calls):
                continue  # never ran, no batch dimension, or not reached by the backward: the fallback
            cands = {attr: self.params[pname].detach() for attr, pname in own.items()}
            consts = {k: v.detach() for k, v in module.named_parameters() if k not in cands}
            slots = tensor_slots(module)
            total = _batched_local(module, calls, n, set(own))  # None: not a module it takes
            if total is None and any(c.get("seq_first") for c in calls):  # kept for _rnn_grads only
                self._no_local.update(own.values())
                continue
            try:
                for call in calls if total is None else ():
                    g = _module_grads(module, cands, consts, call, slots)
                    total = g if total is None else {k: total[k] + g[k] for k in g}
            except Exception:  # noqa: BLE001 (torch.func cannot run this module, e.g. a GRU: the fallback does)
                self._no_local.update(own.values())
                continue
            for attr, pname in own.items():
                out[pname] = total[attr]
        unchecked = [pname for pname in out if pname not in self._local_checked]
        if unchecked:
            k = min(2, n)
            ref = self._make_last_resort(self.model, unchecked, self.reader)(self.reader.take(batch, slice(0, k)))
            # rounding noise is judged against the largest gradient checked: a parameter whose gradient is zero
            # by structure (PoolFormer's norm bias before `pool(x) - x`) holds noise on both sides
            noise = max(float(r.abs().max()) for r in ref.values()) * 100
            for pname in unchecked:
                g = out[pname][:k] if isinstance(out[pname], torch.Tensor) else _dense(out[pname])(0, k)
                r = ref[pname].to(g.dtype)
                rtol = 1e-7 if g.dtype == torch.float64 else 1e-3
                atol = rtol * float(r.abs().max()) + noise * torch.finfo(g.dtype).eps + 1e-30
                if not torch.allclose(g, r, rtol=rtol, atol=atol):
                    # a layer scale read wrongly tries the module-local path next (checked in its turn)
                    (self._not_elementwise if pname in scales else self._no_local).add(pname)
                    del out[pname]
                elif k == 2:  # a batch of one cannot show a module that mixes samples or groups rows wrongly
                    self._local_checked.add(pname)
        return out

    def _agree(self, needs: list[bool]) -> list[bool]:
        """Whether to run each of the one-off extra passes: ``needs`` here; whether any rank needs it under
        FSDP2, where all ranks run every forward."""
        return needs

    def _checked(self, name: str, cap: _Capture) -> bool:
        """Whether the batch-first check answered for this rule layer in the layout this chunk captured it in (dim 0
        or, transposed, dim 1: a sequence whose length equals the chunk's size looks batch-first)."""
        known = name in self._batch_first or name in self._not_batch_first
        return known and bool(cap.seq_first and cap.seq_first[0]) == (name in self._seq_first_checked)

    def _check_samples(self, batch: Any, n: int, losses: torch.Tensor, caps: dict[str, _Capture],
                       unchecked: list[str]) -> None:
        """The first two samples, each as a batch of one: their losses in the batched forward must be their
        losses alone (checked once: a BatchNorm without running statistics, or any layer mixing samples,
        breaks that), and each ``unchecked`` rule layer's inputs alone must be the slices ``[i]`` of its
        batched inputs. A layer that sees the samples on another dimension (a ``batch_first=False``
        transformer: tokens first) has a dim 0 of the batch's size when the sequence happens to be that long;
        its rule would read tokens as samples, so it goes to the fallback; one whose dim 1 had the batch's size is
        captured transposed, and checked the same way. Each layer is checked once per layout, on the first chunk of
        two or more samples where it is captured so (a batch of one is right either way); the answers are kept with
        the other decisions."""
        seen: dict[str, list] = {name: [] for name in unchecked}
        failed: set[str] = set()

        def keep(name):
            def hook(module, inputs, output):
                x = inputs[0] if inputs else None
                flags = caps[name].seq_first
                if isinstance(x, torch.Tensor) and caps[name].group > 1:
                    x = x.unsqueeze(0)  # one sample's windows, as the batched capture holds them
                elif isinstance(x, torch.Tensor) and len(seen[name]) < len(flags) and flags[len(seen[name])]:
                    x = x.transpose(0, 1)  # samples on dim 1, as the batched capture was transposed
                seen[name].append(x.detach().clone() if isinstance(x, torch.Tensor) else None)
            return hook

        with torch.no_grad():
            for i in range(min(2, n) if not self._separable else 1):  # one forward when only layers are checked
                for calls in seen.values():
                    calls.clear()
                one = self._loss_alone(batch, i, {name: keep(name) for name in unchecked})
                failed.update(name for name in unchecked if not _same_sample(seen[name], caps[name].inputs, i))
                if not self._separable and not torch.allclose(losses[i], one, rtol=1e-4,
                                                              atol=1e-6 * (1 + float(one.abs()))):
                    raise _NoPerSampleLoss(
                        f"sample {i}'s loss in the batch ({float(losses[i]):.6g}) is not its loss alone "
                        f"({float(one):.6g}): the model mixes samples in eval mode (a BatchNorm without running "
                        "statistics?), so one batched backward cannot give per-sample gradients")
        self._separable = True
        for name in unchecked:  # the answer for the layout this chunk captured (another one is checked again)
            yes, no = (self._not_batch_first, self._batch_first) if name in failed else \
                (self._batch_first, self._not_batch_first)
            yes.add(name)
            no.discard(name)
            if caps[name].seq_first[0]:
                self._seq_first_checked.add(name)
            else:
                self._seq_first_checked.discard(name)

    def _expansion_fails(self, batch: Any, n: int, losses: torch.Tensor, leaf_grads: dict[str, torch.Tensor],
                         caps: dict[str, _Capture]) -> set[str] | None:
        """Once: with shared outputs and parameters expanded per sample, the losses must be the model's own
        (a model that sums or concatenates them over dim 0 would differ), each expanded output's gradient in
        sample ``i``'s row must be its gradient on sample ``i`` alone, and the expanded parameters' gradients
        those of the loop on the first samples. None where all hold; else the outputs and parameters whose own
        check failed (empty where only the losses say which: the caller tries each copy alone). torchvision's
        Swin V2 flattens each block's position-bias MLP output: its copies fail one by one in one pass."""
        with torch.no_grad():
            plain = self._losses(batch, n)
        holds = torch.allclose(losses, plain, rtol=1e-5, atol=1e-6 * float(plain.abs().max()) + 1e-30)
        # (its forwards run even where the losses already differ: under FSDP2 every rank runs the same ones)
        expanded = sorted(name for name, cap in caps.items() if cap.expanded)
        failing = self._expanded_outputs_failing(batch, n, {name: caps[name] for name in expanded})
        flags = self._agree([not holds] + [name in failing for name in expanded])  # under FSDP2, every rank alike
        failing = {name for name, bad in zip(expanded, flags[1:]) if bad}
        if failing or flags[0]:
            return failing
        if not leaf_grads:
            return None
        k = min(2, n)
        ref = self._make_last_resort(self.model, list(leaf_grads), self.reader)(self.reader.take(batch, slice(0, k)))
        failing = set()
        for pname, g in leaf_grads.items():
            r = ref[pname].to(g.dtype)
            rtol = 1e-7 if g.dtype == torch.float64 else 1e-3
            if not torch.allclose(g[:k], r, rtol=rtol, atol=rtol * float(r.abs().max()) + 1e-30):
                failing.add(pname)
        return failing or None

    # -- per-sample losses --------------------------------------------------------------------------------
    def _run(self, batch: Any) -> Any:
        if self._swap:
            return swapped_call(self._forward_module, self._swap, (batch,), slots=self._slots)
        return self.reader.run(self.model, batch)

    def _losses(self, batch: Any, n: int) -> torch.Tensor:
        """Each sample's loss, from one forward over the chunk: the loss a batch of that sample alone gives."""
        reader = self.reader
        if reader.loss_fn is not None:
            outputs = self._run(batch)
            return torch.stack([reader.loss(_take_outputs(outputs, i, n), reader.take(batch, slice(i, i + 1)))
                                for i in range(n)])
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                return self._losses_without_labels(batch, n)
            labels = batch["labels"]
            outputs = self._run(batch)  # with the labels: a forward= may read them; the batch loss goes unused
            try:
                logits = logits_of(outputs)
            except GradselError as exc:  # a model that returns only its loss: no per-sample form to write
                raise _NoPerSampleLoss(f"{type(self.model).__name__} returns no logits beside its loss") from exc
            forms = {**_hf_forms(self.model, logits, labels, n), **_ctc_forms(self.model, logits, batch, n)}
            return self._form_losses(forms, batch)
        outputs = self._run(batch)
        return _cross_entropy(logits_of(outputs), batch[1], n)

    def _losses_without_labels(self, batch: Mapping, n: int) -> torch.Tensor:
        """A dict batch without ``labels``: extractive question answering's ``start_positions`` and ``end_positions``
        have a per-sample form (checked as the others are); a model whose loss comes from other keys has none here
        (the fallback computes its Fisher; ``loss=`` gives the hooks engine one)."""
        outputs = self._run(batch)

        def get(key):
            return outputs.get(key) if isinstance(outputs, Mapping) else getattr(outputs, key, None)

        if get("loss") is None:
            raise GradselError("the model returned no loss for a dict batch: include 'labels' in the batch "
                               "or pass loss=(outputs, batch) -> scalar tensor")
        start, end = get("start_logits"), get("end_logits")
        if isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor) and start.dim() == 2 and {
                "start_positions", "end_positions"} <= set(batch):
            forms = {"span": lambda: _span_loss(start, end, batch["start_positions"], batch["end_positions"], n)}
            return self._form_losses(forms, batch)
        raise _NoPerSampleLoss(f"{type(self.model).__name__} computes its loss from a batch without 'labels' (keys: "
                               f"{', '.join(map(str, batch))}), for which no per-sample form is known")

    def _form_losses(self, forms: dict[str, Callable], batch: Any) -> torch.Tensor:
        """The per-sample losses by the form that equals the model's own loss (found once)."""
        if self._loss_form is None:
            self._loss_form = self._check_form(forms, batch)
        return forms[self._loss_form]()

    def _check_form(self, forms: dict[str, Callable], batch: Any) -> str:
        """Which per-sample form equals the model's own loss, on the chunk's first sample."""
        with torch.no_grad():
            own = self.reader.loss(self._run(self.reader.take(batch, slice(0, 1))), batch).double()
            for name, form in forms.items():
                value = form()[0].detach().double()
                if torch.isfinite(value) and abs(float(value - own)) <= 1e-4 * (1 + abs(float(own))):
                    return name
        raise _NoPerSampleLoss(f"the loss of {type(self.model).__name__} ({float(own):.4g} on a sample) matches "
                               f"none of the per-sample forms known ({', '.join(forms) or 'none for these shapes'})")


def _widened(xs: list[torch.Tensor], ds: list[torch.Tensor]) -> tuple[list, list]:
    """Inputs and output gradients in one floating dtype, at least float32: under autocast a layer's input
    (float32) and its output gradient (bfloat16) differ, and squares are formed in float32 at least."""
    floats = [t.dtype for t in xs + ds if t.is_floating_point()]
    wide = floats[0]
    for dt in floats[1:]:
        wide = torch.promote_types(wide, dt)
    if wide in (torch.float16, torch.bfloat16):
        wide = torch.float32
    return ([x.to(wide) if x.is_floating_point() else x for x in xs], [d.to(wide) for d in ds])


def _module_grads(module: nn.Module, cands: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
                  call: dict, slots: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """``{attr: (n, *shape)}``: per-sample gradients of ``module``'s own parameters for one captured call."""
    flat, spec, batched, group = call["flat"], call["spec"], call["batched"], call["group"]
    rows = [t for t, b in zip(flat, batched) if b]
    deltas = [torch.zeros(shape, dtype=cands[next(iter(cands))].dtype, device=rows[0].device if rows else None)
              if g is None else g for g, shape, b in zip(call["grads"], call["shapes"], call["out_batched"]) if b]
    if group > 1:  # each sample's rows (its windows) as one call of the module
        rows, deltas = ([t.reshape(-1, group, *t.shape[1:]) for t in ts] for ts in (rows, deltas))
    one = (lambda t: t.unsqueeze(0)) if group == 1 else (lambda t: t)

    def one_sample(params, rows_i, deltas_i):
        it = iter(rows_i)
        args, kwargs = pytree.tree_unflatten([one(next(it)) if b else t for t, b in zip(flat, batched)], spec)
        outs = pytree.tree_leaves(swapped_call(module, {**consts, **params}, tuple(args), kwargs, slots=slots))
        picked = [t for t, b in zip(outs, call["out_batched"]) if b]
        return sum((o.reshape(d.shape) * d.to(o.dtype)).sum() for o, d in zip(picked, deltas_i))

    with torch.enable_grad(), warnings.catch_warnings():
        # SDPA has no vmap batching rule yet; torch warns once per op and runs a correct slow path
        warnings.filterwarnings("ignore", message="There is a performance drop")
        try:
            return vmap(grad(one_sample), in_dims=(None, 0, 0))(cands, rows, deltas)
        except Exception:  # noqa: BLE001 (torch.func cannot run it: a custom autograd.Function, peft's LoHa)
            pass
        # the same gradients sample by sample, of this module alone (not of the whole model, as the fallback takes)
        params = {k: v.detach().requires_grad_() for k, v in cands.items()}
        per = []
        for i in range(rows[0].shape[0]):
            out = one_sample(params, [t[i] for t in rows], [d[i] for d in deltas])
            got = torch.autograd.grad(out, list(params.values()), allow_unused=True)
            per.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), got)])
        return {k: torch.stack([sample[j] for sample in per]) for j, k in enumerate(params)}


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_grads(module: nn.Module, calls: list[dict], n: int, want: set[str]) -> dict[str, Any] | None:
    """``nn.MultiheadAttention`` (batch first, or sequence first as :meth:`HooksEngine._seq_first_call` kept it; one
    packed in-projection, no bias_k/v or zero attention, no active
    dropout, the attention weights unused), without a torch.func pass per sample: for each captured call, one
    batched recomputation of the attention from its projected queries, keys and values gives their gradients
    (the output gradient passed back through ``out_proj`` and the attention), and the projections are Linears
    over the tokens: ``[δqᵀ x_q; δkᵀ x_k; δvᵀ x_v]`` for ``in_proj_weight``, ``δᵀ·attention`` for
    ``out_proj.weight``, a block of samples at a time. None where a call is outside that (torch.func takes it)."""
    if not (type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim and module.bias_k is None
            and not module.add_zero_attn and (module.batch_first or all(c.get("seq_first") for c in calls))
            and not (module.training and module.dropout > 0)):
        return None
    e, h = module.embed_dim, module.num_heads
    inputs, deltas, attended, douts = [], [], [], []  # per call: (x_q, x_k, x_v), (δq, δk, δv), attention, δ
    for call in calls:
        args, kwargs = pytree.tree_unflatten(call["flat"], call["spec"])
        try:
            bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        qkv, dout = (a["query"], a["key"], a["value"]), call["grads"][0]
        if call.get("seq_first"):  # (L, n, E) → (n, L, E)
            if any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in qkv):
                return None
            qkv = tuple(t.transpose(0, 1).contiguous() for t in qkv)
            dout = None if dout is None else dout.transpose(0, 1)
        if (call["group"] != 1 or dout is None or any(g is not None for g in call["grads"][1:])
                or qkv[0].dim() != 3 or any(t.shape[0] != n for t in qkv)):
            return None
        xs, (dout,) = _widened(list(qkv), [dout])
        mask = _attention_mask(a["attn_mask"], a["key_padding_mask"], n, h, dout.dtype)
        if mask is False:
            return None
        w = module.in_proj_weight.detach().to(dout.dtype)
        b = None if module.in_proj_bias is None else module.in_proj_bias.detach().to(dout.dtype)
        with torch.enable_grad(), torch.autocast(dout.device.type, enabled=False):
            proj = [F.linear(x, w[j * e:(j + 1) * e], None if b is None else b[j * e:(j + 1) * e])
                    .detach().requires_grad_(True) for j, x in enumerate(xs)]
            heads = [t.view(n, t.shape[1], h, e // h).transpose(1, 2) for t in proj]
            att = F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).reshape(n, -1, e)
            grads = torch.autograd.grad(att, proj, dout @ module.out_proj.weight.detach().to(dout.dtype))
        inputs.append(xs)
        deltas.append(grads)
        attended.append(att.detach())
        douts.append(dout)
    x = [_stack_tokens([c[j] for c in inputs], n) for j in range(3)]
    d = [_stack_tokens([c[j] for c in deltas], n) for j in range(3)]
    out: dict[str, Any] = {}
    if "in_proj_weight" in want:
        qkv = [_token_grads(dj, xj, n) for dj, xj in zip(d, x)]
        out["in_proj_weight"] = BlockGrads(lambda s, t, scratch=None: torch.cat([g.make(s, t) for g in qkv], 1), n,
                                           max(1, qkv[0].block // 3))
    if "in_proj_bias" in want:
        out["in_proj_bias"] = torch.cat([dj.sum(1) for dj in d], 1)
    made = _linear(module.out_proj, attended, douts, {a for a in ("weight", "bias") if f"out_proj.{a}" in want}, n)
    out.update({f"out_proj.{a}": g for a, g in made.items()})
    return out


def _rnn_grads(module: nn.Module, calls: list[dict], n: int, want: set[str]) -> dict[str, Any] | None:
    """An ``nn.LSTM`` (no projection), ``nn.GRU`` or Elman ``nn.RNN`` (tanh or ReLU), batch-first or sequence-first
    (whose calls :meth:`HooksEngine._seq_first_call` kept), stacked or not, either direction or both, without a
    per-sample run: each layer's and direction's hidden states from one batched run of torch's kernel, bottom up;
    then, top down, every step's gradients of the gates' input and hidden parts (the same for an LSTM and an RNN; a
    GRU's candidate gate takes its hidden part through the reset gate) for the whole batch by
    :func:`_lstm_gate_grads` / :func:`_gru_gate_grads` / :func:`_elman_grads`, fed with the gradients of the layer's
    output sequence (captured for the top layer, ``Σ_d δu_d W_ih,d`` from the layer above otherwise) and of its
    final states. ``Σ_t δu_t x_tᵀ`` is ``weight_ih``'s, ``Σ_t δv_t h_{t-1}ᵀ`` ``weight_hh``'s, ``Σ_t δu_t`` and
    ``Σ_t δv_t`` the biases' (a sample's several sequences, one after another on dim 0, summed as more steps). Steps
    are on dim 0 throughout (torch's own layout), so that each step's slice is contiguous. None where a call is
    outside that (dropout between layers while training, among others)."""
    lstm, elman = type(module) is nn.LSTM, type(module) is nn.RNN
    if not (type(module) in _RNNS and (module.batch_first or all(c.get("seq_first") for c in calls))
            and getattr(module, "proj_size", 0) == 0
            and not (module.training and module.dropout > 0 and module.num_layers > 1)):
        return None
    hidden, dirs, states, layers = module.hidden_size, 2 if module.bidirectional else 1, 2 if lstm else 1, \
        module.num_layers
    kernel = (torch.lstm if lstm else torch.gru if not elman else
              torch.rnn_relu if module.nonlinearity == "relu" else torch.rnn_tanh)
    tokens: dict[str, list] = {}  # per layer and direction's suffix: inputs, δu, δv and h_{t-1}, steps first
    for call in calls:
        args, kwargs = pytree.tree_unflatten(call["flat"], call["spec"])
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        grads = call["grads"]
        rows = n * call["group"]  # several sequences a sample (Sequencer's rows and columns), one after another
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1 if call.get("seq_first") else 0] != rows
                or len(grads) != 1 + states or all(g is None for g in grads)):
            return None
        if not call.get("seq_first"):  # (rows, T, ·) → (T, rows, ·); the final states are alike in both layouts
            x = x.transpose(0, 1)
            grads = [None if grads[0] is None else grads[0].transpose(0, 1), *grads[1:]]
        (x,), _ = _widened([x], [g for g in grads if g is not None])
        dtype = x.dtype
        hx = None if hx is None else (hx if lstm else (hx,))
        layer_in = [x.contiguous()]
        runs = []  # per layer: suffixes, stacked weights, initial states, inputs, h_{t-1}; directions on dim 1
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            for layer in range(layers):
                outs, sfxs, ws, h0s, runs_in, prevs = [], [], [], [], [], []
                for d in range(dirs):
                    sfx = f"_l{layer}" + ("_reverse" if d else "")
                    w = [getattr(module, f"{k}{sfx}").detach().to(dtype)
                         for k in (("weight_ih", "weight_hh", "bias_ih", "bias_hh") if module.bias
                                   else ("weight_ih", "weight_hh"))]
                    k = layer * dirs + d
                    h = [t[k:k + 1].detach().to(dtype) for t in hx] if hx is not None else \
                        [x.new_zeros(1, rows, hidden) for _ in range(states)]
                    run = layer_in[-1].flip(0) if d else layer_in[-1]  # the direction's own order of steps
                    seq = kernel(run, tuple(h) if lstm else h[0], w, module.bias, 1, 0.0, False, False, False)[0]
                    sfxs.append(sfx), ws.append(w), h0s.append(h), runs_in.append(run)
                    prevs.append(torch.cat([h[0], seq[:-1]], 0))
                    outs.append(seq.flip(0) if d else seq)
                runs.append((sfxs, ws, h0s, runs_in, torch.stack(prevs, 1)))
                layer_in.append(torch.cat(outs, -1) if dirs == 2 else outs[0])
            g_out = None if grads[0] is None else grads[0].to(dtype)  # the top layer's output sequence
            for layer in range(layers - 1, -1, -1):
                sfxs, ws, h0s, runs_in, prev = runs[layer]
                ks = slice(layer * dirs, (layer + 1) * dirs)
                # (T, D, n, ·): every direction's steps in its own order, advanced together
                g_seq = None if g_out is None else torch.stack(
                    [g_out[..., d * hidden:(d + 1) * hidden].flip(0) if d else g_out[..., :hidden]
                     for d in range(dirs)], 1)
                finals = [None if g is None else g[ks].to(dtype) for g in grads[1:]]
                w_hh = torch.stack([w[1] for w in ws])
                b_hh = torch.stack([w[3] for w in ws]) if module.bias else None
                u = torch.stack([F.linear(run, w[0], w[2] if module.bias else None) for run, w in zip(runs_in, ws)], 1)
                if lstm:
                    du_run = dv_run = _lstm_gate_grads(u, prev, torch.cat([h[1] for h in h0s]), w_hh, b_hh, g_seq,
                                                       *finals)
                elif elman:
                    du_run = dv_run = _elman_grads(u, prev, w_hh, b_hh, g_seq, finals[0], module.nonlinearity == "relu")
                else:
                    du_run, dv_run = _gru_gate_grads(u, prev, w_hh, b_hh, g_seq, finals[0])
                g_below = None
                for d, (sfx, w) in enumerate(zip(sfxs, ws)):
                    du = du_run[:, d].flip(0) if d else du_run[:, d]  # in the input's order of steps
                    if layer:  # the gradient of the layer below's output sequence
                        g_in = du @ w[0]
                        g_below = g_in if g_below is None else g_below + g_in
                    part = tokens.setdefault(sfx, [[], [], [], []])
                    for j, t in enumerate((layer_in[layer], du, dv_run[:, d], prev[:, d])):
                        part[j].append(t.transpose(0, 1))  # (rows, T, ·), a view
                g_out = g_below
    out: dict[str, Any] = {}
    for sfx, parts in tokens.items():
        x, du, dv, prev = (_stack_tokens(t, n) for t in parts)
        for name, left, right in ((f"weight_ih{sfx}", du, x), (f"weight_hh{sfx}", dv, prev)):
            if name in want:
                out[name] = _token_grads(left, right, n)
        for name, g in ((f"bias_ih{sfx}", du), (f"bias_hh{sfx}", dv)):
            if name in want:
                out[name] = g.sum(1)
    return out


def _recurrent_part(u: torch.Tensor | None, prev: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None
                    ) -> torch.Tensor:
    """Every step's ``u + W_hh h_{t-1} + b_hh`` (T, D, n, G·H), steps first and contiguous, for D directions at once:
    ``prev`` the h_{t-1} (T, D, n, H), ``w_hh`` (D, G·H, H) and ``b_hh`` (D, G·H) stacked; one product a direction."""
    steps, dirs, n, hidden = prev.shape
    part = torch.bmm(prev.transpose(0, 1).reshape(dirs, steps * n, hidden), w_hh.transpose(1, 2))
    part = part.view(dirs, steps, n, -1).transpose(0, 1)
    out = part.contiguous() if u is None else u + part  # u first: the sum takes its (steps-first) layout
    return out if b_hh is None else out.add_(b_hh[:, None])


def _elman_grads(u, prev, w_hh, b_hh, g_seq, g_hn, relu: bool):
    """Elman ``nn.RNN`` gradients of each step's pre-activation ``u + W_hh h_{t-1} + b_hh`` (T, D, n, H), for D
    directions at once, each in its own order of steps: the activation's derivative known at once from ``h_{t-1}``
    (``prev``), then one multiply and one batched (n, H)·(H, H) product a step. ReLU's derivative is 0 where the
    pre-activation is 0, as autograd's."""
    z = _recurrent_part(u, prev, w_hh, b_hh)
    deriv = (z > 0).to(z.dtype) if relu else 1 - z.tanh().square()
    du = torch.empty_like(u)
    dh_next = torch.zeros_like(prev[0]) if g_hn is None else g_hn
    for t in range(u.shape[0] - 1, -1, -1):
        dh = dh_next if g_seq is None else dh_next + g_seq[t]
        torch.mul(dh, deriv[t], out=du[t])
        dh_next = torch.bmm(du[t], w_hh)
    return du


def _gru_gate_grads(u, prev, w_hh, b_hh, g_seq, g_hn):
    """GRU gradients of each step's gate input part ``u`` and hidden part ``v = W_hh h_{t-1} + b_hh`` (T, D, n, 3H
    each, gates r, z, n), for D directions at once, each in its own order of steps. Given ``h_{t-1}`` (``prev``, from
    the batched run) every gate is known at once, and each step's gradients are the hidden state's gradient ``δh_t``
    times factors of those gates: backpropagation through time is one multiply for both parts (they share the
    gradients of gates r and z) and one batched (n, 3H)·(3H, H) product a step."""
    steps, dirs, n, hidden = prev.shape
    v = _recurrent_part(None, prev, w_hh, b_hh)
    (ur, uz, un), (vr, vz, vn) = u.chunk(3, -1), v.chunk(3, -1)
    r, z = (ur + vr).sigmoid(), (uz + vz).sigmoid()
    cand = (un + r * vn).tanh()
    a = (1 - z) * (1 - cand * cand)  # ∂(candidate's pre-activation) per δh
    # (T, D, n, 4, H): the factors of gates r and z (the same for both parts), of the candidate's hidden part (it
    # takes r), then of its input part; a step's first three blocks are δv, and blocks 0, 1, 3 δu
    coef = torch.empty(*prev.shape[:3], 4, hidden, dtype=u.dtype, device=u.device)
    torch.mul(a * vn, r * (1 - r), out=coef[..., 0, :])
    torch.mul(prev - cand, z * (1 - z), out=coef[..., 1, :])
    torch.mul(a, r, out=coef[..., 2, :])
    coef[..., 3, :] = a
    duv = torch.empty_like(coef)
    dh_next = torch.zeros_like(prev[0]) if g_hn is None else g_hn
    for t in range(steps - 1, -1, -1):
        dh = dh_next if g_seq is None else dh_next + g_seq[t]
        torch.mul(dh.unsqueeze(2), coef[t], out=duv[t])
        dh_next = torch.baddbmm(dh * z[t], duv[t, :, :, :3].reshape(dirs, n, 3 * hidden), w_hh)
    return duv[..., [0, 1, 3], :].flatten(-2), duv[..., :3, :].flatten(-2)


def _lstm_gate_grads(u, prev, c0, w_hh, b_hh, g_seq, g_hn, g_cn):
    """Each step's gate gradients ``δ_t`` (T, D, n, 4H) of D LSTM directions at once, each in its own order of
    steps: the gates recomputed at once from the input projection ``u`` and the hidden states ``prev`` (h_{t-1}, from
    the batched run), the cells by their elementwise recurrence (one fused multiply-add a step), then
    backpropagation through time with one batched (n, 4H)·(4H, H) product a step; ``c0`` (D, n, H) the initial
    cells, ``g_seq``, ``g_hn``, ``g_cn`` the gradients of the sequence and the final states (or None)."""
    steps, dirs, n, hidden = prev.shape
    gates = _recurrent_part(u, prev, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    i, f, o, g = i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()
    ig = i * g
    c = torch.empty_like(prev)
    state = c0
    for t in range(steps):
        state = torch.addcmul(ig[t], f[t], state, out=c[t])
    tc = c.tanh()
    back_c = o * (1 - tc * tc)  # ∂c_t/∂h_t-side factor: δc_t gets δh_t · o_t · (1 − tanh²c_t)
    c_prev = torch.cat([c0.unsqueeze(0), c[:-1]], 0)
    # (T, D, n, 3, H): the factors of δc_t in gates i, f (with c_{t-1}) and g; gate o takes δh_t
    coef_c = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 3)
    coef_o = tc * o * (1 - o)
    grads = torch.empty_like(gates)
    dh_next = torch.zeros_like(c0) if g_hn is None else g_hn
    dc_next = torch.zeros_like(c0) if g_cn is None else g_cn
    for t in range(steps - 1, -1, -1):
        dh = dh_next if g_seq is None else dh_next + g_seq[t]
        dc = torch.addcmul(dc_next, dh, back_c[t])
        row = grads[t]
        torch.mul(dc.unsqueeze(2), coef_c[t], out=row[..., :3 * hidden].view(dirs, n, 3, hidden))
        torch.mul(dh, coef_o[t], out=row[..., 3 * hidden:])
        dh_next = torch.bmm(row, w_hh)
        dc_next = dc * f[t]
    return grads


_RNNS = (nn.LSTM, nn.GRU, nn.RNN)  # the recurrent modules that _rnn_grads takes (exact types: subclasses may differ)


def _seq_first_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of a sequence-first call (``batch_first=False``, torch's default: steps on dim 0, samples on dim 1)
    of an LSTM, GRU, RNN or ``nn.MultiheadAttention``, on a batched (3-D) tensor; None for any other call."""
    if type(module) in _RNNS:
        x = args[0] if args else kwargs.get("input")
    elif type(module) is nn.MultiheadAttention:
        x = args[0] if args else kwargs.get("query")
    else:
        return None
    return x if not module.batch_first and isinstance(x, torch.Tensor) and x.dim() == 3 else None


def _batched_local(module: nn.Module, calls: list[dict], n: int, want: set[str]) -> dict[str, Any] | None:
    """A module-local gradient from a batched recomputation, for the modules that have one, else None."""
    if isinstance(module, nn.MultiheadAttention):
        return _mha_grads(module, calls, n, want)
    if type(module) in _RNNS:
        return _rnn_grads(module, calls, n, want)
    return None


def _attention_mask(attn_mask, key_padding_mask, n: int, heads: int, dtype: torch.dtype):
    """``nn.MultiheadAttention``'s masks as one additive mask for ``F.scaled_dot_product_attention`` (True in a
    bool mask: not attended), None without masks, False for a shape it does not take."""
    def additive(m):
        if m.dtype != torch.bool:
            return m.to(dtype)
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))

    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            mask = additive(attn_mask)
        elif attn_mask.dim() == 3 and attn_mask.shape[0] == n * heads:
            mask = additive(attn_mask).view(n, heads, *attn_mask.shape[1:])
        else:
            return False
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != n:
            return False
        pad = additive(key_padding_mask).view(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def _dense(g: Any) -> Callable[[int, int], torch.Tensor]:
    """``make(start, stop)``: the per-sample gradients of samples ``start:stop`` as a dense tensor."""
    if isinstance(g, torch.Tensor):
        return lambda s, e: g[s:e]
    if isinstance(g, OuterSquares):
        return lambda s, e: g.delta[s:e, :, None] * g.inputs[s:e, None, :]
    if isinstance(g, BlockGrads):
        return lambda s, e: g.make(s, e, None)  # fresh blocks: they are summed
    if isinstance(g, EmbeddingGrads):
        def rows(s, e):
            k, (num, dim) = e - s, g.module.weight.shape
            ids = g.ids[s:e].reshape(k, -1).long() + (torch.arange(k, device=g.ids.device) * num)[:, None]
            dense = torch.zeros(k * num, dim, dtype=g.grads.dtype, device=g.grads.device)
            dense.index_add_(0, ids.reshape(-1), g.grads[s:e].reshape(-1, dim)).reshape(k, num, dim)
            dense = dense.reshape(k, num, dim)
            if g.module.padding_idx is not None:
                dense[:, g.module.padding_idx] = 0
            return dense
        return rows
    raise TypeError(f"no dense form for {type(g).__name__}")


def _summed(parts: list, n: int, param: torch.Tensor) -> BlockGrads:
    """A tied parameter: each sample's gradients from every layer that holds it, summed before squaring."""
    makers = [_dense(g) for g in parts]
    block = max(1, BLOCK_BYTES // max(1, param.numel() * 8))
    return BlockGrads(lambda s, e, scratch=None: sum(m(s, e) for m in makers), n, block)


def _passes_through(node: Any) -> bool:
    """FSDP2's ``RegisterPostBackwardFunction``, which every unit's forward applies to its inputs: an identity that
    reads no parameter, so it hides no use (taken as opaque, every FSDP2 model was, and a layer that never runs,
    as smp's Unet with ``encoder_depth=3`` leaves its encoder's last stages, went to a fallback FSDP2 cannot run)."""
    cls = getattr(node, "_forward_cls", None)
    return (cls is not None and cls.__name__ == "RegisterPostBackwardFunction"
            and cls.__module__.startswith("torch.distributed.fsdp"))


def _parameter_uses(losses: torch.Tensor) -> tuple[Counter, bool]:
    """How often each parameter enters autograd's graph of ``losses``, and whether the graph holds custom
    Python functions (reentrant checkpointing) that can hide parameter uses.

    A use is an edge into the parameter's AccumulateGrad node; under autocast a parameter is cast once per
    forward and the cast reused by every call, so the uses of a cast (``ToCopyBackward0``) count instead."""
    incoming: Counter = Counter()
    nodes: dict[int, Any] = {}
    opaque = False
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        if isinstance(node, torch.autograd.function.BackwardCFunction) and not _passes_through(node):
            opaque = True
        for nxt, _ in node.next_functions:
            if nxt is not None:
                incoming[id(nxt)] += 1
                if id(nxt) not in nodes:
                    stack.append(nxt)
    uses: Counter = Counter()
    for node in nodes.values():
        variable = getattr(node, "variable", None)
        if variable is not None:
            continue
        for nxt, _ in node.next_functions:
            variable = getattr(nxt, "variable", None)
            if variable is None:
                continue
            cast = type(node).__name__ == "ToCopyBackward0" and len(node.next_functions) == 1
            uses[id(variable)] += incoming[id(node)] if cast else 1
    return uses, opaque


def _take_outputs(outputs: Any, i: int, n: int) -> Any:
    """Sample ``i`` (as a batch of one) of every output tensor that carries the batch dimension."""
    leaves, spec = pytree.tree_flatten(outputs)
    return pytree.tree_unflatten([x[i:i + 1] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
                                  else x for x in leaves], spec)


def _same_sample(alone: list, batched: list[torch.Tensor], i: int) -> bool:
    """Whether a layer's inputs in sample ``i``'s batch of one are the slices ``i`` of its batched inputs. A batch
    of one runs other kernels than the batch, so their rounding differs and grows with depth (deep in a float32
    MobileNetV2, up to 7e-6 of the layer's largest input, which near-zero entries cannot pass at a relative
    tolerance); what this check is for, another sample's or another token's values, is off by the scale
    itself. So rounding is judged against the scale: up to a thousand of the dtype's epsilons of it (at most 1%)."""
    if len(alone) != len(batched):
        return False
    for x, xb in zip(alone, batched):
        if x is None or x.shape != xb[i:i + 1].shape:
            return False
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            noise = min(1e3 * torch.finfo(x.dtype).eps, 1e-2) * scale
            if not torch.allclose(x, xb[i:i + 1].to(x.dtype), rtol=1e-4, atol=1e-6 * (1 + scale) + noise):
                return False
        elif not torch.equal(x, xb[i:i + 1]):
            return False
    return True


def _modified(caps: dict[str, _Capture]) -> bool:
    for cap in caps.values():
        if any(x._version != v for x, v in zip(cap.inputs, cap.versions)):
            return True
        if any(g is not None and g[0]._version != g[1] for g in cap.grads):
            return True
    return False
