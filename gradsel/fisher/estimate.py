"""Diagonal Fisher from per-sample gradients: the public ``fisher``, the whole-model torch.func engine and the
batch-of-one reference loop (the per-layer hooks engine is in ``engines/``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .. import distributed
from ..errors import GradselError
from ..params import ParamSpec, resolve
from .batches import BatchReader, ForwardFn, LossFn, gather, is_single_batch, numbered
from .layout import norm_gradients_as_inputs
from .rules import LazyGrads, output_rules
from .result import Fisher
from .swap import swapped_call, tensor_slots

__all__ = ["fisher", "fisher_loop", "eval_mode"]

KINDS = ("empirical", "mc")
ENGINES = ("auto", "vmap", "loop", "hooks")
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-sample gradients held at once
MAX_CHUNK = 32


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; give each its own previous mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Runner(nn.Module):
    """Wraps model + batch reader so that ``functional_call`` (:func:`swapped_call`) can run a user's ``forward``
    too."""

    def __init__(self, model: nn.Module, reader: BatchReader):
        super().__init__()
        self.model = model
        self.reader = reader

    def forward(self, batch: Any) -> torch.Tensor:
        return self.reader.loss(self.reader.run(self.model, batch), batch)


class _Engine:
    """Computes per-sample gradients of the candidate parameters for a batch: ``{name: (n, *shape)}``."""

    name = "?"

    def __init__(self, model: nn.Module, names: list[str], reader: BatchReader):
        self.model = model
        self.reader = reader
        self.runner = _Runner(model, reader)
        params = dict(model.named_parameters())
        self.names = names
        self.cands = {n: params[n].detach() for n in names}
        chosen = set(names)
        self.consts = {"model." + n: p.detach() for n, p in params.items() if n not in chosen}
        self.consts.update({"model." + n: b for n, b in model.named_buffers()})
        self.slots = tensor_slots(self.runner)

    def _call(self, cands: dict[str, torch.Tensor], batch: Any, extra: dict | None = None) -> torch.Tensor:
        tensors = {"model." + n: t for n, t in cands.items()}
        tensors.update(self.consts)
        if extra:
            tensors.update(extra)
        return swapped_call(self.runner, tensors, (batch,), slots=self.slots)


class _VmapEngine(_Engine):
    name = "vmap"

    def __init__(self, model: nn.Module, names: list[str], reader: BatchReader):
        super().__init__(model, names, reader)
        self.rules = output_rules(model, names)
        self._mask_holds: dict[int, bool] = {}  # sequence length -> the 4-D attention mask gives the model's outputs

    def __call__(self, batch: Any) -> dict[str, torch.Tensor | LazyGrads]:
        batch = self._vmap_mask(batch)
        n = self.reader.size(batch)
        leaves, spec, is_batched = self.reader.batched_leaves(batch, n)
        batched = [x for x, b in zip(leaves, is_batched) if b]
        shapes = self._rule_outputs(self.reader.take(batch, slice(0, 1))) if self.rules else {}
        probes = {name: torch.zeros((n, *shape), dtype=dtype, device=self.cands[name].device)
                  for name, (shape, dtype) in shapes.items()}
        cands = {name: t for name, t in self.cands.items() if name not in probes}
        fixed = {"model." + name: self.cands[name] for name in probes}
        live: dict[str, Any] = {}
        seen_inputs: dict[str, torch.Tensor] = {}

        def add_probe(name):
            def hook(module, inputs, output):
                if name in live:
                    seen_inputs[name] = inputs[0]
                    return output + live[name]
            return hook

        def one_sample(cands, probes, rows):
            it = iter(rows)
            full = [next(it).unsqueeze(0) if b else x for x, b in zip(leaves, is_batched)]
            live.clear()
            live.update(probes)
            seen_inputs.clear()
            loss = self._call(cands, pytree.tree_unflatten(full, spec), fixed)
            return loss, dict(seen_inputs)

        handles = [self.rules[name][0].register_forward_hook(add_probe(name)) for name in probes]
        try:
            with warnings.catch_warnings():
                # SDPA has no vmap batching rule yet; torch warns once per op and runs a correct slow path
                warnings.filterwarnings("ignore", message="There is a performance drop")
                (grads, probe_grads), inputs = vmap(grad(one_sample, argnums=(0, 1), has_aux=True),
                                                    in_dims=(None, 0, 0))(cands, probes, batched)
        finally:
            for h in handles:
                h.remove()
            live.clear()
        for name in probes:
            module, rule = self.rules[name]
            grads[name] = rule(module, inputs[name], probe_grads[name])
        return {name: grads[name] for name in self.names}

    def _vmap_mask(self, batch: Any) -> Any:
        """The batch with the 4-D attention mask that vmap can trace (:meth:`BatchReader.for_vmap`), once the model's
        outputs on a chunk were found the same with it as with the user's 2-D mask. The 4-D mask replaces
        the model's own mask building: a model that builds more than the padding and causal masks from it (Gemma 3's
        sliding windows, MPT's reading of the mask) would compute something else, silently. Checked again for each
        new sequence length (a window shorter than the sequence shows only on sequences that long)."""
        converted = self.reader.for_vmap(self.model, batch)
        if converted is batch:
            return batch
        mask = batch["attention_mask"]
        length = mask.shape[1]
        if length not in self._mask_holds:
            # on the chunk's longest and shortest samples (samples do not interact): a window shows on the longest if
            # on any, a misread padding on the most padded
            tokens = mask.sum(1)
            pair = torch.tensor(sorted({int(tokens.argmax()), int(tokens.argmin())}))
            with torch.no_grad():
                own, four = ([t for t in pytree.tree_leaves(self.reader.run(self.model, self.reader.take(b, pair)))
                              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
                             for b in (batch, converted))
            self._mask_holds[length] = len(own) == len(four) and all(
                a.shape == b.shape and torch.allclose(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
                for a, b in zip(own, four))
        if not self._mask_holds[length]:
            raise RuntimeError(f"{type(self.model).__name__}'s outputs change when its 2-D attention_mask is given as "
                               "the 4-D additive mask that vmap can trace (it builds other masks from it: sliding "
                               "windows, ALiBi?)")
        return converted

    def _rule_outputs(self, one: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape (for one sample) and dtype of each rule layer's output; layers called more than once
        per forward are left to vmap."""
        calls: dict[str, list] = {name: [] for name in self.rules}
        handles = [m.register_forward_hook(lambda mod, i, out, name=name: calls[name].append(out))
                   for name, (m, _) in self.rules.items()]
        try:
            with torch.no_grad():
                self.reader.run(self.model, one)
        finally:
            for h in handles:
                h.remove()
        return {name: (tuple(outs[0].shape), outs[0].dtype) for name, outs in calls.items() if len(outs) == 1}


class _LoopEngine(_Engine):
    """The reference: one backward per sample, on a batch of size one."""

    name = "loop"

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        n = self.reader.size(batch)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for i in range(n):
            one = self.reader.take(batch, slice(i, i + 1))
            leaves = {name: t.clone().requires_grad_(True) for name, t in self.cands.items()}
            with norm_gradients_as_inputs(self.model):  # torch's batch-norm backward on one sample (layout.py)
                loss = self._call(leaves, one)
                # no candidate reaches the loss (timm's LeViT reads its attention biases from a cache made
                # without grad in eval mode): their gradients are zero
                grads = (torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if loss.requires_grad
                         else [None] * len(leaves))
            for name, g in zip(self.names, grads):
                # nn.Embedding(sparse=True) gives its rows as a sparse gradient: densified, one sample at a time
                out[name].append(torch.zeros_like(leaves[name]) if g is None else g.to_dense() if g.is_sparse else g)
        return {name: torch.stack(gs) for name, gs in out.items()}


def _as_masks(per_sample: Any, names: list[str], model: nn.Module) -> dict[str, torch.Tensor | None] | None:
    """Normalise ``per_sample=``: ``True`` → all candidates; names → whole tensors; dict → bool masks."""
    if per_sample is None or per_sample is False:
        return None
    if per_sample is True:
        return {n: None for n in names}
    if isinstance(per_sample, Mapping):
        masks = dict(per_sample)
    elif isinstance(per_sample, Sequence) and not isinstance(per_sample, str):
        masks = {n: None for n in per_sample}
    else:
        raise GradselError("per_sample= takes True, a list of parameter names or a dict name → bool mask")
    unknown = [n for n in masks if n not in names]
    if unknown:
        raise GradselError(f"per_sample= names parameters that are not candidates: {unknown[:5]}; "
                           "add them to params= or leave them out")
    return masks


def _sample_filter(samples: Any) -> torch.Tensor | None:
    """A sorted index tensor of the samples to use, or None for all."""
    if samples is None:
        return None
    t = torch.as_tensor(samples)
    if t.dtype == torch.bool:
        t = t.nonzero().flatten()
    if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise GradselError("samples= takes a 1-D tensor of sample indices or a boolean mask over samples")
    return torch.unique(t.long())  # sorted, without repeats


def _total_hint(data: Any, reader: BatchReader, num_samples: int | None,
                subset: torch.Tensor | None) -> int | None:
    """How many samples the progress bar should expect, when that can be known without reading data."""
    totals = [x for x in (num_samples, None if subset is None else len(subset)) if x is not None]
    if totals:
        return min(totals)
    if isinstance(data, (list, tuple)) and not is_single_batch(data):
        try:
            return sum(reader.size(b) for b in data)
        except GradselError:
            return None  # the batches are read (and complained about) properly below
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def fisher(model: nn.Module, data: Any, *, params: ParamSpec | None = None, loss: LossFn | None = None,
           forward: ForwardFn | None = None, kind: str = "empirical", num_samples: int | None = None,
           chunk_size: int | None = None, progress: bool = True, per_sample: Any = None,
           samples: Any = None, engine: str = "auto", seed: int = 0,
           memory_budget: int = DEFAULT_MEMORY_BUDGET, scores: bool = True, group: Any = None) -> Fisher:
    """Estimate the diagonal Fisher information from per-sample gradients.

    Each entry is ``mean_i g_i²`` where ``g_i`` is the gradient that a batch holding only sample ``i``
    gives. The engine is ``torch.func.vmap(grad(...))`` over chunks of each batch; the squares of a
    chunk are summed before the next chunk runs, so memory is bounded by ``chunk_size × parameters``.
    The model runs in eval mode (dropout off, BatchNorm on running statistics); its modes, parameters,
    buffers and ``.grad`` fields are left as they were.

    Args:
        model: any ``nn.Module``.
        data: a DataLoader/iterable of batches, or one batch. Batches are ``(inputs, targets, ...)``
            (cross-entropy on the logits; classification ``(N,)`` or segmentation ``(N, H, W)`` targets),
            HF-style dicts (``model(**batch).loss``), or anything read by ``forward``/``loss``.
        params: candidate parameters (names, globs, module classes, callable); default all that require
            grad, or a peft model's adapter parameters.
        loss: ``loss(outputs, batch) -> scalar`` for one sample (a batch of size one).
        forward: ``forward(model, batch) -> outputs``.
        kind: ``"empirical"`` uses the data's labels; ``"mc"`` draws labels from the model's predictive
            distribution (one draw per sample), which estimates the true Fisher.
        num_samples: stop after exactly this many samples.
        chunk_size: samples per vmap call; default derived from ``memory_budget``.
        progress: show a progress bar.
        per_sample: also return each sample's ``Σ_j g_ij²`` over a parameter subset (``True`` for all
            candidates, a list of names, or a dict name → bool mask) as ``Fisher.per_sample``.
        samples: only use these sample positions (indices into the data's order, or a bool mask). Their
            rows are packed into batches of ``chunk_size`` (default: the data's batch size) and the data
            is read up to the batch holding the last of them; a position past the end raises.
        engine: ``"auto"`` (whole-model ``torch.func.vmap``, falling back to the loop with a warning where
            vmap cannot run the model), ``"vmap"``, ``"hooks"`` (per layer, from one ordinary forward and
            backward: faster, composes with activation checkpointing and autocast, but assumes that the
            model's batched forward treats each sample on its own, which it checks on a chunk's first
            samples only; see docs/concepts.md) or ``"loop"`` (the batch-of-one reference).
        seed: seeds the label draws of ``kind="mc"``, together with each sample's position: a sample gets
            the same labels however the data is batched or subset.
        memory_budget: bytes of per-sample gradients to hold at once when ``chunk_size`` is not given.
        scores: ``False`` skips the Fisher itself and computes only ``per_sample`` (which it then requires),
            differentiating only the parameters that ``per_sample`` names: cheaper when only the
            samples' contributions are wanted. The result maps no names; NaN/Inf is checked on the
            contributions.
        group: a torch.distributed process group; default the world group when torch.distributed is
            initialised. Each rank estimates on the samples it is given and the sums and counts are
            all-reduced: every rank returns the Fisher over all ranks' samples (see
            ``docs/scaling-out.md``; positions, ``samples=`` and ``num_samples=`` are then global). A DDP
            wrapper is looked through (names without ``module.``).

    Returns:
        A :class:`Fisher` mapping name → tensor of the parameter's shape.

    >>> import torch, torch.nn as nn
    >>> model = nn.Linear(3, 2)
    >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> f = fisher(model, batch, progress=False)
    >>> f["weight"].shape, f.num_samples
    (torch.Size([2, 3]), 8)
    """
    if kind not in KINDS:
        raise GradselError(f"kind={kind!r} is not known: use one of {KINDS}")
    if engine not in ENGINES:
        raise GradselError(f"engine={engine!r} is not known: use one of {ENGINES}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise GradselError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise GradselError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    model = distributed.unwrap(model)
    names = resolve(model, params)
    masks = _as_masks(per_sample, names, model)
    if not scores:
        if masks is None:
            raise GradselError("scores=False leaves nothing to compute: pass per_sample= (True, names or masks) "
                               "to get each sample's contribution, or keep scores=True for the Fisher")
        names = [n for n in names if n in masks]
    subset = _sample_filter(samples)
    reader = BatchReader(forward, loss)
    shard = distributed.shard_of(data, group, reader, subset=subset, num_samples=num_samples, kind=kind)
    if shard is not None:  # positions and counts are global: this rank reads its own samples among them
        subset, num_samples = shard.subset, None
    if distributed.is_fsdp(model):  # FSDP2: each rank keeps its shard of the Fisher (gradsel/fsdp.py)
        from ..fsdp import estimate as sharded_estimate

        return sharded_estimate(model, data, names, reader, shard, masks=masks, subset=subset, chunk_size=chunk_size,
                                kind=kind, seed=seed, scores=scores, engine=engine, progress=progress)
    all_params = dict(model.named_parameters())
    acc_dtype = {n: torch.float64 if all_params[n].dtype == torch.float64 else torch.float32 for n in names}
    acc = ({n: torch.zeros(all_params[n].shape, dtype=acc_dtype[n], device=all_params[n].device) for n in names}
           if scores else None)
    flat_masks = None
    if masks is not None:
        flat_masks = {n: None if m is None else
                      torch.as_tensor(m, dtype=torch.bool).reshape(-1).to(all_params[n].device)
                      for n, m in masks.items()}
    contributions: list[torch.Tensor] = []
    used_index: list[torch.Tensor] = []

    user_chunk = chunk_size  # samples= packs its rows into batches of this size (default: the data's)
    if chunk_size is None:
        # per-sample gradients that vmap materialises (rule layers hold far less), times 3 for the
        # square and the sum; at most 32 samples so that activations stay small too
        ruled = set(output_rules(model, names)) if engine != "loop" else set()
        dense = sum(all_params[n].numel() for n in names if n not in ruled)
        chunk_size = int(min(MAX_CHUNK, max(1, memory_budget // max(1, dense * 4 * 3))))

    if engine == "hooks":
        from .engines import HooksEngine  # imported here: it builds on this module's vmap and loop engines

        run = HooksEngine(model, names, reader, _VmapEngine, _LoopEngine)
    else:
        run = (_LoopEngine if engine == "loop" else _VmapEngine)(model, names, reader)
    used = 0
    bar = tqdm(total=_total_hint(data, reader, num_samples, subset), unit="sample", desc="fisher", disable=not progress,
               leave=False)
    try:
        with eval_mode(model), torch.enable_grad():
            batches = numbered(data, reader) if subset is None else gather(data, subset, reader, user_chunk)
            if shard is not None:
                batches = shard.positions(batches)
            for index, batch in batches:
                if num_samples is not None and used + len(index) > num_samples:
                    index = index[: num_samples - used]
                    batch = reader.take(batch, slice(0, len(index)))
                # labels against the logits (shape, class range), before any engine or fallback runs
                reader.check_outputs(model, batch, index, classes=kind != "mc")
                if kind == "mc":
                    batch = reader.with_sampled_labels(model, batch, seed, index)
                for start in range(0, len(index), chunk_size):
                    rows = index[start:start + chunk_size]
                    chunk = reader.take(batch, slice(start, start + len(rows)))
                    grads, run = _per_sample_grads(run, chunk, engine, rows)
                    c = _accumulate(acc, grads, rows, flat_masks, acc_dtype)
                    del grads, chunk  # free this chunk's per-sample gradients before the next is formed
                    if c is not None:
                        contributions.append(c)
                    used_index.append(rows)
                    used += len(rows)
                    bar.update(len(rows))
                if num_samples is not None and used >= num_samples:
                    break
    finally:
        bar.close()
    if shard is not None:  # the ranks' sums and counts added (before the division); per-sample rows gathered
        used, contributions, used_index = shard.reduce(acc, used, contributions, used_index, masks is not None)
        num_samples = shard.num_samples
    if used == 0:
        raise GradselError("no samples were read from data: check that the loader is not empty "
                           "(and that samples= selects some)")
    if num_samples is not None and used < num_samples:
        warnings.warn(f"num_samples={num_samples} asked for, but data held only {used}; the Fisher uses {used}",
                      stacklevel=2)
    means = {n: a.div_(used) for n, a in acc.items()} if acc is not None else {}
    _warn_unreached([n for n, a in means.items() if not a.any()], len(means))
    return Fisher(means, used, kind=kind,
                  per_sample=torch.cat(contributions) if masks is not None else None,
                  sample_index=torch.cat(used_index), engine=run.name)


def _warn_unreached(dead: list[str], total: int) -> None:
    """Say which candidates have a zero Fisher on every sample: no policy can rank them. Either the forward
    never takes them to the loss (a module it skips, as the deeper stages of an smp encoder cut by
    ``encoder_depth``, or a parameter read through a cache made without grad) or a factor beside them is zero
    (LoRA's A while B is zero)."""
    if dead:
        shown = ", ".join(dead[:5]) + (f" and {len(dead) - 5} more" if len(dead) > 5 else "")
        warnings.warn(f"gradsel.fisher: {len(dead)} of {total} candidate tensors have a zero Fisher on every "
                      f"sample ({shown}), so no policy can tell their entries apart: the forward does not take them to "
                      "the loss, or a factor beside them is zero (LoRA's A while B is zero: train B a few steps "
                      "first); leave them out with params=, or check the forward", RuntimeWarning, stacklevel=3)


def _per_sample_grads(run: _Engine, chunk: Any, engine: str, rows: torch.Tensor) -> tuple[dict[str, Any], _Engine]:
    """Run the engine on a chunk; return the gradients and the engine to use for the next chunk.

    With ``engine="auto"``, a failure of vmap is tried on the batch-of-one loop: if the loop runs, vmap
    cannot run this model (warn, naming the innermost module that raised, and keep the loop); if the loop
    fails too, the model, ``forward=`` or ``loss=`` is at fault and that error is raised.
    """
    if engine == "vmap":
        try:
            return run(chunk), run
        except GradselError:
            raise
        except Exception as exc:
            raise GradselError(f"gradsel.fisher(engine='vmap'): torch.func.vmap cannot run {_raised_in(exc, run)} "
                               f"({type(exc).__name__}: {_first_line(exc)}). Pass engine='auto' (vmap where it "
                               "runs, else the batch-of-one loop) or engine='hooks' (per layer; modules without a "
                               "rule get the loop)") from exc
    if engine != "auto":
        return run(chunk), run
    if isinstance(run, _LoopEngine):  # after a fallback
        return _run_loop(run, chunk, rows), run
    try:
        return run(chunk), run
    except GradselError:
        raise
    except Exception as exc:  # vmap cannot run every model; the loop can
        loop = _LoopEngine(run.model, run.names, run.reader)
        grads = _run_loop(loop, chunk, rows)
        what = "torch.func.vmap" if isinstance(run, _VmapEngine) else f"the {run.name} engine"
        warnings.warn(f"gradsel.fisher: {what} cannot run {_raised_in(exc, run)} "
                      f"({type(exc).__name__}: {_first_line(exc)}); the batch-of-one loop runs it, so gradsel is "
                      "falling back to the batch-of-one loop, which is slower. Pass engine='loop' to skip the attempt"
                      + ("; engine='hooks' (per layer, from one batched forward and backward; docs/concepts.md says "
                         "what it assumes) is faster on most models." if isinstance(run, _VmapEngine) else "."),
                      RuntimeWarning, stacklevel=3)
        return grads, loop


def _run_loop(loop: "_LoopEngine", chunk: Any, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loop on a chunk; an error is raised as a GradselError naming the sample and where it arose."""
    try:
        return loop(chunk)
    except GradselError:
        raise
    except Exception:
        for i in range(len(rows)):  # find the first sample that fails alone
            try:
                loop(loop.reader.take(chunk, slice(i, i + 1)))
            except GradselError:
                raise
            except Exception as exc:
                raise GradselError(
                    f"{_raised_in(exc, loop)} raised on sample {int(rows[i])} alone (a batch of one, without vmap), "
                    f"so this is not a limitation of vmap: {type(exc).__name__}: {_first_line(exc)}. Check that "
                    "sample's data and the model, forward= and loss= on it") from exc
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _raised_in(exc: BaseException, run: _Engine) -> str:
    """Where ``exc`` arose: the innermost module of the model whose code is on its traceback, else the loss
    or ``forward=`` (read from the traceback's frames, including those of the exceptions it chains)."""
    names = {id(m): name for name, m in run.model.named_modules()}
    module, place = None, None
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                module = owner
            elif owner is run.reader and frame.f_code.co_name in ("loss", "run"):
                place = frame.f_code.co_name
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    if module is not None:
        name = names[id(module)]
        return f"{type(module).__name__} ({'the model itself' if not name else f'module {name!r}'})"
    reader = run.reader
    if place == "loss":
        return "loss=" if reader.loss_fn is not None else "the loss"
    if place == "run" and reader.forward_fn is not None:
        return "forward="
    return type(run.model).__name__


ONE_PASS_NUMEL = 1 << 14  # from this many elements a tensor's per-sample squares are added one sample at a time


def _accumulate(acc: dict[str, torch.Tensor] | None, grads: dict[str, Any], rows: torch.Tensor,
                masks: dict[str, torch.Tensor | None] | None,
                dtypes: dict[str, torch.dtype]) -> torch.Tensor | None:
    """Add the chunk's squared gradients to ``acc`` (unless it is None); return per-sample contributions if
    asked for. A NaN/Inf in what is computed raises, naming the parameter and the first sample behind it."""
    c = len(rows)
    contrib = torch.zeros(c, dtype=torch.float64) if masks is not None else None
    for name, g in grads.items():
        want = masks is not None and name in masks
        mask = masks.get(name) if want else None
        target = None if acc is None else acc[name]
        if isinstance(g, LazyGrads):
            part = g.accumulate(target, want, mask, dtypes[name])
            # one check per chunk on what was summed (finite before this chunk); the culprit is found only
            # when it fails
            if not bool(torch.isfinite((target if target is not None else part).sum())):
                _raise_nonfinite(name, rows, (~torch.isfinite(g.sample_totals(dtypes[name]))).nonzero().flatten())
        else:
            # Never written into: autograd's per-sample gradients can alias other gradients that a rule still
            # reads (timm ViT: pos_embed's gradient is a view of the patch conv's output gradient), and vmap
            # may return an expanded (stride-0) tensor.
            flat = g.to(dtypes[name]).reshape(c, -1)
            if (mask is not None and want) or flat.shape[1] < ONE_PASS_NUMEL:
                sq = flat.square()
                part = (sq.sum(1) if mask is None else sq @ mask.to(sq.dtype)) if want else None
                total = sq.sum(0) if target is not None else part
                if target is not None:
                    target.view(-1).add_(total)
            else:  # one pass over each sample's gradient, no tensor of squares
                part = torch.stack([torch.dot(row, row) for row in flat]) if want else None
                if target is not None:
                    for row in flat:
                        target.view(-1).addcmul_(row, row)
                total = target if target is not None else part
            if not bool(torch.isfinite(total.sum())):
                _raise_nonfinite(name, rows, (~torch.isfinite(flat.square()).all(1)).nonzero().flatten())
        if part is not None:
            contrib += part.double().cpu()
    return contrib


def _raise_nonfinite(name: str, rows: torch.Tensor, bad: torch.Tensor) -> None:
    first = int(rows[int(bad[0])]) if len(bad) else int(rows[0])
    raise GradselError(f"the per-sample gradient of {name!r} for sample {first} is NaN or Inf "
                       "(or its square overflows): check that sample's inputs and labels, the loss, "
                       "and the learning rate of any training before; estimate in float32, not fp16")


def fisher_loop(model: nn.Module, data: Any, **kwargs) -> Fisher:
    """The reference estimator: one backward per sample (a batch of size one), as FISH Mask computes it.

    Same arguments and result as :func:`fisher`; slower. Used by the tests and as vmap's fallback.

    >>> import torch, torch.nn as nn
    >>> model = nn.Linear(3, 2)
    >>> batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    >>> torch.allclose(fisher_loop(model, batch, progress=False)["weight"],
    ...                fisher(model, batch, progress=False)["weight"], atol=1e-6)
    True
    """
    kwargs["engine"] = "loop"
    return fisher(model, data, **kwargs)
