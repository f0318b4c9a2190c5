"""Reading batches: how to run the model on one, what its loss is, how to split it into samples."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import GradselError

ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch rather than an iterable of batches."""
    if isinstance(data, Mapping):
        return any(isinstance(v, torch.Tensor) for v in data.values())
    if isinstance(data, (tuple, list)) and data:
        return isinstance(data[0], torch.Tensor)
    return False


def iter_batches(data: Any) -> Iterator[Any]:
    if isinstance(data, torch.Tensor):
        raise GradselError("got a bare tensor as data: pass (inputs, targets) batches, HF-style dicts with "
                           "'labels', or a DataLoader of either")
    if is_single_batch(data):
        yield data
        return
    if not isinstance(data, Iterable):
        raise GradselError(f"cannot iterate over data of type {type(data).__name__}: pass a DataLoader, a list of "
                           "batches or one batch")
    yield from data


def numbered(data: Any, reader: "BatchReader") -> Iterator[tuple[torch.Tensor, Any]]:
    """``(positions, batch)`` for every batch of ``data``, positions counted from 0 in the data's order."""
    seen = 0
    for batch in iter_batches(data):
        reader.check(batch)
        n = reader.size(batch)
        yield torch.arange(seen, seen + n), batch
        seen += n


def gather(data: Any, positions: torch.Tensor, reader: "BatchReader",
           size: int | None = None) -> Iterator[tuple[torch.Tensor, Any]]:
    """The samples of ``data`` at sorted ``positions``, as ``(positions, batch)`` packed into batches of at
    least ``size`` rows (default: the data's first batch size) wherever their tensors can be concatenated
    (HF batches padded to other lengths stay apart).

    Reading stops after the batch holding the last position; a position past the data's end raises. Running
    each original batch on the few rows it keeps instead would cost one vmap call per batch touched.
    """
    if len(positions) == 0:
        return
    last = int(positions[-1])
    seen, parts, where, rows = 0, [], [], 0
    for batch in iter_batches(data):
        reader.check(batch)
        n = reader.size(batch)
        size = size or n
        hit = positions[(positions >= seen) & (positions < seen + n)] - seen
        if len(hit):
            part = batch if len(hit) == n else reader.take(batch, hit)
            if parts and not _can_join(parts[0], part, reader):
                yield torch.cat(where), _join(parts, reader)
                parts, where, rows = [], [], 0
            parts.append(part)
            where.append(hit + seen)
            rows += len(hit)
            if rows >= size:
                yield torch.cat(where), _join(parts, reader)
                parts, where, rows = [], [], 0
        seen += n
        if seen > last:
            break
    if parts:
        yield torch.cat(where), _join(parts, reader)
    if seen <= last:
        raise GradselError(f"samples= asks for position {last}, but the data held only {seen} samples "
                           f"(positions 0 to {seen - 1}): pass positions in the data's order, counted from 0")


def _can_join(a: Any, b: Any, reader: "BatchReader") -> bool:
    """Same structure; batched tensors alike but for their first dimension; everything else equal."""
    la, spec_a, ba = reader.batched_leaves(a, reader.size(a))
    lb, spec_b, bb = reader.batched_leaves(b, reader.size(b))
    if spec_a != spec_b or ba != bb:
        return False
    for x, y, batched in zip(la, lb, ba):
        if batched:
            if x.shape[1:] != y.shape[1:] or x.dtype != y.dtype or x.device != y.device:
                return False
        elif x is not y:
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                        and x.dtype == y.dtype and bool(torch.equal(x, y))):
                    return False
            else:
                try:
                    if not bool(x == y):
                        return False
                except Exception:
                    return False
    return True


def _join(parts: list, reader: "BatchReader") -> Any:
    if len(parts) == 1:
        return parts[0]
    flat = [reader.batched_leaves(p, reader.size(p)) for p in parts]
    leaves, spec, batched = flat[0]
    out = [torch.cat([f[0][i] for f in flat]) if b else x for i, (x, b) in enumerate(zip(leaves, batched))]
    return pytree.tree_unflatten(out, spec)


def _sample_generator(seed: int, position: int) -> torch.Generator:
    """A generator of its own for the sample at ``position``.

    torch's CPU generator keeps only the low 32 bits of a seed, so ``(seed, position)`` is mixed down to 32
    bits (splitmix64's finaliser): different seeds give unrelated draws for the same sample.
    """
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return torch.Generator().manual_seed((z ^ (z >> 31)) & 0xFFFFFFFF)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, or the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise GradselError(f"cannot find logits in a model output of type {type(outputs).__name__}: "
                       "pass loss=(outputs, batch) -> scalar tensor")


class BatchReader:
    """Knows the batch format: its size, how to slice it, how to run the model and take the loss.

    Tuples/lists are ``(inputs, targets, ...)`` with cross-entropy on the logits by default; dicts are
    HF-style (``model(**batch).loss``); anything else needs ``forward`` and ``loss``.
    """

    def __init__(self, forward: ForwardFn | None = None, loss: LossFn | None = None):
        self.forward_fn = forward
        self.loss_fn = loss

    # -- format ---------------------------------------------------------------------------------------
    def check(self, batch: Any) -> None:
        if isinstance(batch, Mapping):
            return
        if isinstance(batch, (tuple, list)):
            if self.forward_fn is None and len(batch) < 2:
                raise GradselError(f"a tuple batch needs (inputs, targets), got {len(batch)} element(s); "
                                   "or pass forward=/loss= callables")
            return
        if self.forward_fn is None or self.loss_fn is None:
            raise GradselError(f"cannot read a batch of type {type(batch).__name__}: use (inputs, targets) tuples, "
                               "HF-style dicts with 'labels', or pass forward=(model, batch) and loss=(outputs, batch)")

    def size(self, batch: Any) -> int:
        leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not leaves:
            raise GradselError(f"batch of type {type(batch).__name__} holds no tensor with a batch dimension")
        return leaves[0].shape[0]

    @staticmethod
    def batched_leaves(batch: Any, n: int) -> tuple[list, Any, list[bool]]:
        leaves, spec = pytree.tree_flatten(batch)
        is_batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n for x in leaves]
        return leaves, spec, is_batched

    def take(self, batch: Any, index: torch.Tensor | slice) -> Any:
        """Rows ``index`` of every tensor that carries the batch dimension."""
        n = self.size(batch)
        leaves, spec, is_batched = self.batched_leaves(batch, n)
        if isinstance(index, torch.Tensor):
            out = [x.index_select(0, index.to(x.device)) if b else x for x, b in zip(leaves, is_batched)]
        else:
            out = [x[index] if b else x for x, b in zip(leaves, is_batched)]
        return pytree.tree_unflatten(out, spec)

    # -- model and loss -------------------------------------------------------------------------------
    def run(self, model: nn.Module, batch: Any) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(model, batch)
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(batch[0])

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            value = self.loss_fn(outputs, batch)
        elif isinstance(batch, Mapping):
            value = getattr(outputs, "loss", None)
            if value is None and isinstance(outputs, Mapping):
                value = outputs.get("loss")
            if value is None:
                raise GradselError("the model returned no loss for a dict batch: include 'labels' in the batch "
                                   "or pass loss=(outputs, batch) -> scalar tensor")
        elif isinstance(batch, (tuple, list)):
            value = F.cross_entropy(logits_of(outputs), batch[1])
        else:  # check() rules this out
            raise GradselError("no loss for this batch type: pass loss=")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise GradselError(f"the loss must be a scalar tensor, got {type(value).__name__} "
                               f"{tuple(getattr(value, 'shape', ()))}: reduce it (e.g. .mean()) in loss=")
        return value.reshape(())

    # -- Monte-Carlo labels ---------------------------------------------------------------------------
    def with_sampled_labels(self, model: nn.Module, batch: Any, seed: int, positions: torch.Tensor) -> Any:
        """The batch with its labels replaced by draws from the model's predictive distribution.

        Each sample's draws come from its own generator, seeded by ``seed`` and the sample's position in the
        data: a sample gets the same labels however the data is batched, chunked or subset.
        """
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise GradselError("kind='mc' needs a 'labels' entry in dict batches to replace")
            class_dim = -1
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            class_dim = 1
        else:
            raise GradselError("kind='mc' works with (inputs, targets) tuples and dicts with 'labels'")
        with torch.no_grad():
            logits = logits_of(self.run(model, batch)).float()
        if logits.dim() == 1:
            raise GradselError("kind='mc' needs class logits of shape (N, C, ...); got a 1-D output")
        probs = torch.softmax(logits.movedim(class_dim, -1), dim=-1).cpu()
        draws = torch.stack([
            torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=_sample_generator(seed, int(pos)))
            .reshape(p.shape[:-1]) for p, pos in zip(probs, positions)])
        if isinstance(batch, Mapping):
            target = batch["labels"]
            out = dict(batch)
            out["labels"] = draws.to(target.device).reshape(target.shape)
            return out
        target = batch[1]
        out = list(batch)
        out[1] = draws.to(target.device).reshape(target.shape)
        return type(batch)(out) if isinstance(batch, tuple) else out

    # -- vmap preparation -----------------------------------------------------------------------------
    @staticmethod
    def for_vmap(model: nn.Module, batch: Any) -> Any:
        """Turn an HF 2-D ``attention_mask`` into the 4-D additive mask that runs under vmap.

        transformers builds its mask with data-dependent control flow (``padding_mask.all()``), which
        vmap cannot trace; a ready 4-D mask skips that code. Causal models get the causal triangle too.
        """
        if not (isinstance(batch, Mapping) and hasattr(model, "config")):
            return batch
        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return batch
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        keep = mask.bool()[:, None, None, :]  # (N, 1, 1, T)
        if any(getattr(m, "is_causal", False) is True for m in model.modules()):
            t = mask.shape[1]
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None, None]
        additive = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        additive = additive.masked_fill(~keep, torch.finfo(dtype).min)
        out = dict(batch)
        out["attention_mask"] = additive
        return out
