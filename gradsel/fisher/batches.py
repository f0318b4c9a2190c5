"""Reading batches: how to run the model on one, what its loss is, how to split it into samples."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import GradselError

ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]

IGNORE_INDEX = -100  # the class index that F.cross_entropy (and HF models) skip
# the class-index dtype that both engines take: F.cross_entropy takes int64 and uint8, vmap's gather int64
# and int32
CLASS_INDEX_DTYPES = (torch.int64,)
# keys of an HF batch that hold the samples (the first present gives the batch size), and keys that must
# have one row per sample too
HF_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
HF_PER_SAMPLE_KEYS = ("labels", "attention_mask", "token_type_ids")


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


def _builds_cache(model: nn.Module) -> bool:
    """Whether ``model`` is an HF model that builds a key/value cache by default (``config.use_cache``) and takes
    ``use_cache=`` (T5, GPT-2, BART; also through peft, whose wrappers pass keywords on)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is not True:
        return False
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class BatchReader:
    """Knows the batch format: its size, how to slice it, how to run the model and take the loss.

    Tuples/lists are ``(inputs, targets, ...)`` with cross-entropy on the logits by default; dicts are
    HF-style (``model(**batch).loss``, with ``use_cache=False`` for a model that would build a key/value cache);
    anything else needs ``forward`` and ``loss``.
    """

    def __init__(self, forward: ForwardFn | None = None, loss: LossFn | None = None):
        self.forward_fn = forward
        self.loss_fn = loss
        self._logit_shapes: dict[tuple, tuple[int, ...]] = {}  # per-sample input shapes -> logits' shape

    # -- format ---------------------------------------------------------------------------------------
    def check(self, batch: Any) -> None:
        """Checks that need no model: the batch's format, and that labels/targets have one row per sample."""
        if isinstance(batch, Mapping):
            if self.forward_fn is None:
                self._check_dict(batch)
            return
        if isinstance(batch, (tuple, list)):
            if self.forward_fn is None and len(batch) < 2:
                raise GradselError(f"a tuple batch needs (inputs, targets), got {len(batch)} element(s); "
                                   "or pass forward=/loss= callables")
            if self.loss_fn is None:
                self._check_targets(batch)
            return
        if self.forward_fn is None or self.loss_fn is None:
            raise GradselError(f"cannot read a batch of type {type(batch).__name__}: use (inputs, targets) tuples, "
                               "HF-style dicts with 'labels', or pass forward=(model, batch) and loss=(outputs, batch)")

    def _check_targets(self, batch: Sequence) -> None:
        """The default cross-entropy's targets: a tensor with one row per sample, of class indices (or float
        class probabilities, whose shape is checked against the logits in :meth:`check_outputs`)."""
        if len(batch) < 2:
            raise GradselError(f"the default cross-entropy reads the targets from batch[1], but the batch has "
                               f"{len(batch)} element(s): add the targets or pass loss=(outputs, batch) -> scalar")
        n = self.size(batch)
        t = batch[1]
        if not isinstance(t, torch.Tensor):
            raise GradselError(f"batch[1] (the targets) is a {type(t).__name__}; expected a tensor of integer class "
                               f"indices of shape ({n},) (or ({n}, H, W) for segmentation): convert it with "
                               "torch.as_tensor(...), or pass loss=(outputs, batch) -> scalar")
        if t.dim() == 0 or t.shape[0] != n:
            raise GradselError(f"batch[1] (the targets) has shape {tuple(t.shape)}, but the inputs batch[0] hold {n} "
                               f"samples: the targets need one row per sample, shape ({n},) for classification or "
                               f"({n}, H, W) for segmentation (a tensor whose first dimension is not the batch size "
                               "would not be split into samples)")
        if t.is_floating_point():
            if t.dim() == 1:
                raise GradselError(f"batch[1] (the targets) has dtype {t.dtype} and shape {tuple(t.shape)}; the default "
                                   f"cross-entropy expects integer class indices (torch.int64) of shape ({n},): convert "
                                   "them with targets.long(), or pass loss= for a regression or binary target")
        elif t.dtype not in CLASS_INDEX_DTYPES:
            raise GradselError(f"batch[1] (the targets) has dtype {t.dtype}; the default cross-entropy expects class "
                               "indices of dtype torch.int64 (torch.long): convert them with targets.long()")

    def _check_dict(self, batch: Mapping) -> None:
        """An HF batch: labels, attention_mask and token_type_ids have one row per sample."""
        ref, n = self._dict_size(batch)
        for key in HF_PER_SAMPLE_KEYS:
            t = batch.get(key)
            if key == ref or not isinstance(t, torch.Tensor) or n is None:
                continue
            if t.dim() == 0 or t.shape[0] != n:
                raise GradselError(f"batch[{key!r}] has shape {tuple(t.shape)}, but batch[{ref!r}] holds {n} samples: "
                                   f"{key!r} needs one row per sample, shape ({n}, ...) (a tensor whose first "
                                   "dimension is not the batch size would not be split into samples)")

    @staticmethod
    def _dict_size(batch: Mapping) -> tuple[Any, int | None]:
        """The key that gives an HF batch its size (the inputs, else the first batched tensor), and the size."""
        keys = [k for k in HF_INPUT_KEYS if k in batch] + [k for k in batch if k not in HF_PER_SAMPLE_KEYS]
        keys += [k for k in HF_PER_SAMPLE_KEYS if k in batch]
        for k in keys:
            t = batch[k]
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return k, t.shape[0]
        return None, None

    def size(self, batch: Any) -> int:
        """The batch size: that of the inputs (an HF dict's ``input_ids``, a tuple's ``batch[0]``) where they
        carry one, else the first dimension of the first tensor."""
        if self.forward_fn is None and isinstance(batch, Mapping):
            n = self._dict_size(batch)[1]
            if n is not None:
                return n
        if self.forward_fn is None and isinstance(batch, (tuple, list)) and batch:
            inputs = [x for x in pytree.tree_leaves(batch[0]) if isinstance(x, torch.Tensor) and x.dim() > 0]
            if inputs:
                return inputs[0].shape[0]
        leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not leaves:
            raise GradselError(f"batch of type {type(batch).__name__} holds no tensor with a batch dimension")
        return leaves[0].shape[0]

    # -- checks against the model's output ------------------------------------------------------------
    def check_outputs(self, model: nn.Module, batch: Any, positions: torch.Tensor | None = None,
                      classes: bool = True) -> None:
        """Checks of the labels that need the logits: the targets' shape and class range for the default
        cross-entropy, the class range of an HF batch's integer labels.

        The logits' shape comes from a no-grad forward of the batch's first sample, once for each shape of
        the inputs. Run before the engines, so that a bad class index is named before any loss sees it (on
        a GPU it would be a device-side assert). ``classes=False`` checks shapes only (``kind="mc"``
        replaces the labels' values).
        """
        if self.forward_fn is None and isinstance(batch, Mapping):
            labels = batch.get("labels")
            if not classes or self.loss_fn is not None or not isinstance(labels, torch.Tensor) \
                    or labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() == 0:
                return
            shape = self._logits_shape(model, {k: v for k, v in batch.items() if k != "labels"}, labels,
                                       found=False)
            # only where the labels line up with the logits' leading dimensions (sequence and token
            # classification, causal LM) is the model's loss a plain cross-entropy over the last dimension
            if shape is None or len(shape) < 2 or shape[-1] < 2 or tuple(shape[1:-1]) != tuple(labels.shape[1:]):
                return
            self._check_range("batch['labels']", labels, shape[-1], positions)
            return
        if self.loss_fn is not None or not isinstance(batch, (tuple, list)):
            return
        t = batch[1]
        n = t.shape[0]
        shape = self._logits_shape(model, batch, t)
        if shape is None:
            return  # the forward fails: the engine reports it
        if len(shape) < 2:
            raise GradselError(f"the model's output for one sample has shape {shape}; the default cross-entropy "
                               "needs logits of shape (N, C) or (N, C, H, W) with the classes on dim 1: pass "
                               "loss=(outputs, batch) -> scalar")
        c, spatial = shape[1], tuple(shape[2:])
        if c < 2:
            raise GradselError(f"the model's logits have a single class (shape {(n, *shape[1:])}): cross-entropy over "
                               "one class is always zero, so the Fisher would be zero; for a binary or regression "
                               "head pass loss= (e.g. F.binary_cross_entropy_with_logits)")
        want = (n, *spatial)
        if t.is_floating_point():
            if tuple(t.shape[1:]) != tuple(shape[1:]):
                raise GradselError(f"batch[1] (the targets) has dtype {t.dtype} and shape {tuple(t.shape)}; for logits "
                                   f"of shape {(n, *shape[1:])} the default cross-entropy expects integer class indices "
                                   f"(torch.int64) of shape {want}, or class probabilities of the logits' shape "
                                   f"{(n, *shape[1:])}: convert them with targets.long(), or pass loss=")
            return
        if tuple(t.shape) != want:
            hint = (f": flatten them with targets.reshape({n})" if t.numel() == n else
                    "; for another layout of the classes pass loss=")
            raise GradselError(f"batch[1] (the targets) has shape {tuple(t.shape)}; for logits of shape "
                               f"{(n, *shape[1:])} (classes on dim 1) the default cross-entropy expects class "
                               f"indices of shape {want}{hint}")
        if classes:
            self._check_range("batch[1] (the targets)", t, c, positions)

    def _logits_shape(self, model: nn.Module, batch: Any, labels: torch.Tensor,
                      found: bool = True) -> tuple[int, ...] | None:
        """The logits' shape for the batch's first sample (cached by the inputs' per-sample shapes); None
        when the forward fails (the engine then reports the failure), or when the output holds no logits
        and ``found`` is False (else that raises, as the default loss would)."""
        n = self.size(batch)
        leaves, _, batched = self.batched_leaves(batch, n)
        key = tuple((tuple(x.shape[1:]), x.dtype) if b else None
                    for x, b in zip(leaves, batched) if x is not labels)
        cache = self._logit_shapes
        if key not in cache:
            try:
                with torch.no_grad():
                    outputs = self.run(model, self.take(batch, slice(0, 1)))
            except Exception:
                return None
            try:
                cache[key] = tuple(logits_of(outputs).shape)
            except GradselError:
                if found:
                    raise
                cache[key] = None
        return cache[key]

    @staticmethod
    def _check_range(what: str, t: torch.Tensor, classes: int, positions: torch.Tensor | None) -> None:
        bad = (t >= classes) | ((t < 0) & (t != IGNORE_INDEX))
        if not bool(bad.any()):
            return
        first = int(bad.reshape(-1).nonzero()[0])
        row = first // max(1, t[0].numel())
        value = int(t.reshape(-1)[first])
        sample = int(positions[row]) if positions is not None and row < len(positions) else row
        raise GradselError(f"{what} holds class index {value} (sample {sample}); the logits have {classes} classes, so "
                           f"class indices must lie in [0, {classes - 1}] (or be {IGNORE_INDEX}, which cross-entropy "
                           "ignores): check the labels, or the size of the model's head")

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
            if "use_cache" not in batch and _builds_cache(model):
                # estimation never reads a key/value cache, and the hooks engine's module-local gradients run
                # attention layers again, where a cache filled by the batched forward would hand them its keys
                return model(**batch, use_cache=False)
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
        # the labels are replaced: run a dict batch without them, so that the model's loss never sees them
        inputs = ({k: v for k, v in batch.items() if k != "labels"}
                  if isinstance(batch, Mapping) and self.forward_fn is None else batch)
        with torch.no_grad():
            logits = logits_of(self.run(model, inputs)).float()
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
        # an encoder-decoder's mask is the encoder's (its self- and the decoder's cross-attention: (N, 1, 1, T) fits
        # both); the triangle of its causal decoder is not this mask's to add
        if (not getattr(model.config, "is_encoder_decoder", False)
                and any(getattr(m, "is_causal", False) is True for m in model.modules())):
            t = mask.shape[1]
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()[None, None]
        additive = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        additive = additive.masked_fill(~keep, torch.finfo(dtype).min)
        out = dict(batch)
        out["attention_mask"] = additive
        return out
