"""Everything gradsel does across processes: the one module that knows about torch.distributed.

The Fisher is a sum over samples, so under a process group each rank sums the squared per-sample
gradients of the samples it is given, and :func:`reduce_fisher` all-reduces those sums and the sample
count (in buckets of at most :data:`BUCKET_BYTES`) before the division: every rank gets the Fisher that
one process would compute over all the ranks' samples. Per-sample contributions are gathered in global
sample order. :func:`check_masks_agree` compares the ranks' masks by hash; :func:`rewrap` rebuilds a
DDP wrapper after a selection froze whole tensors.

Sample positions across ranks (what ``samples=``, ``kind="mc"`` and ``Fisher.sample_index`` mean):

- a DataLoader with a ``DistributedSampler``: a sample's position is its dataset index (what the sampler
  yields for the current epoch); the duplicates the sampler pads with when the dataset does not divide by
  the world size are skipped, so each sample counts once. One process over the dataset in order (no
  shuffling) numbers the samples the same way.
- anything else: each rank's data is its own shard, numbered rank after rank (rank 0's samples first).

The estimator, the selection and ``Selection.apply`` call into this module; nothing else in gradsel
tests whether a process group exists. Models sharded by FSDP2 (``fully_shard``, :func:`is_fsdp`) are
handled in :mod:`gradsel.fsdp`: the Fisher reduce-scattered per unit, top-k and masks on shards.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch
from torch import nn

from .errors import GradselError

__all__ = ["BUCKET_BYTES", "default_group", "unwrap", "reduce_fisher", "check_masks_agree", "rewrap",
           "shard_of", "Shard", "for_apply", "rewrap_if_needed", "count_allreduce", "is_fsdp"]

#: largest flat buffer per all-reduce (as DDP's default ``bucket_cap_mb=25``)
BUCKET_BYTES = 25 << 20


def _dist():
    import torch.distributed as dist

    return dist


def default_group(group: Any = None) -> Any:
    """The process group to work across: ``group`` if given, else the world group when torch.distributed is
    initialised, else None (a single process: no collective runs)."""
    dist = _dist()
    initialised = dist.is_available() and dist.is_initialized()
    if group is not None:
        if not initialised:
            raise GradselError("group= was given but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group first (torchrun sets up the environment)")
        return group
    return dist.group.WORLD if initialised else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (names as the user wrote them, no ``module.`` prefix)."""
    try:  # another part of gradsel may know more wrappers
        from .params import unwrap_model  # type: ignore[attr-defined]
    except ImportError:
        unwrap_model = None
    if unwrap_model is not None:
        return unwrap_model(model)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _comm_device(group: Any) -> torch.device:
    """Where small collective tensors live: the current GPU for NCCL, the CPU otherwise (gloo)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(values: list[int], group: Any) -> torch.Tensor:
    """(world, len(values)) int64: every rank's ``values``."""
    dist = _dist()
    device = _comm_device(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def _gather_varlen(t: torch.Tensor, counts: list[int], group: Any) -> torch.Tensor:
    """Concatenate every rank's 1-D ``t`` (rank order; rank r holds ``counts[r]`` rows): pad, all-gather, cut."""
    dist = _dist()
    device = _comm_device(group)
    width = max(counts)
    buf = torch.zeros(width, dtype=t.dtype, device=device)
    buf[: len(t)] = t.to(device)
    out = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:c] for o, c in zip(out, counts)]).cpu()


def _all_reduce_bucketed(tensors: list[torch.Tensor], group: Any, bucket_bytes: int) -> dict:
    """Sum ``tensors`` in place across ranks, flattened into buffers of at most ``bucket_bytes`` (one
    tensor larger than that gets a buffer of its own). Returns ``{"collectives", "bytes"}``."""
    dist = _dist()
    device = _comm_device(group)
    stats = {"collectives": 0, "bytes": 0}
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, _), ts in by_kind.items():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in ts + [None]:
            full = t is None or (bucket and size + t.numel() * t.element_size() > bucket_bytes)
            if full and bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket]).to(device)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                stats["collectives"] += 1
                stats["bytes"] += flat.numel() * flat.element_size()
                start = 0
                for b in bucket:
                    b.copy_(flat[start:start + b.numel()].view(b.shape))
                    start += b.numel()
                bucket, size = [], 0
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
    return stats


def reduce_fisher(sums: dict[str, torch.Tensor] | None, count: int, *, per_sample: torch.Tensor | None = None,
                  sample_index: torch.Tensor | None = None, group: Any = None,
                  bucket_bytes: int = BUCKET_BYTES) -> tuple[int, torch.Tensor | None, torch.Tensor | None, dict]:
    """Add the ranks' Fisher sums (in place, bucketed) and counts; gather per-sample rows in sample order.

    Args:
        sums: name → this rank's ``Σ_i g_i²`` (before any division by the count); summed in place. None: none.
        count: samples this rank summed.
        per_sample: this rank's per-sample contributions (aligned with ``sample_index``), or None.
        sample_index: the global position of each sample this rank summed.
        group: the process group (default: the world group, when initialised).
        bucket_bytes: largest flat buffer per all-reduce.

    Returns:
        ``(total_count, per_sample, sample_index, stats)``: contributions and positions of all ranks sorted
        by position, and ``stats = {"collectives", "bytes"}`` (this rank's send volume per collective).

    Raises:
        GradselError: when two ranks summed the same sample position.
    """
    group = default_group(group)
    if group is None:
        return count, per_sample, sample_index, {"collectives": 0, "bytes": 0}
    has_rows = sample_index is not None
    counts = _all_gather_ints([count, int(has_rows)], group)
    stats = {"collectives": 1, "bytes": 16}
    if sums:
        s = _all_reduce_bucketed(list(sums.values()), group, bucket_bytes)
        stats = {k: stats[k] + s[k] for k in stats}
    per_rank = counts[:, 0].tolist()
    total = int(sum(per_rank))
    if not bool(counts[:, 1].all()) or total == 0:
        return total, per_sample, sample_index, stats
    index = _gather_varlen(sample_index.reshape(-1).long(), per_rank, group)
    order = torch.argsort(index, stable=True)
    index = index[order]
    stats["collectives"] += 1
    stats["bytes"] += max(per_rank) * 8
    if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
        dup = int(index[1:][index[1:] == index[:-1]][0])
        raise GradselError(f"sample position {dup} was estimated on more than one rank: give each rank its own "
                           "samples (a DataLoader with torch.utils.data.DistributedSampler), not the same data")
    rows = None
    if per_sample is not None:
        rows = _gather_varlen(per_sample.reshape(-1).double(), per_rank, group)[order]
        stats["collectives"] += 1
        stats["bytes"] += max(per_rank) * 8
    return total, rows, index, stats


# -- which samples this rank holds ---------------------------------------------------------------------------

def _distributed_sampler(data: Any):
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(data, DataLoader):
        return None
    for s in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(s, DistributedSampler):
            return s
    return None


def _refuse_accelerate_shard(data: Any) -> None:
    """A DataLoader that ``accelerator.prepare`` sharded: its batches carry no global positions, and with
    ``even_batches`` (the default) the last batches repeat samples, so the Fisher would count them twice."""
    sampler = getattr(data, "batch_sampler", None)
    kinds = {type(data).__name__, type(sampler).__name__}
    if type(data).__module__.startswith("accelerate") and kinds & {"BatchSamplerShard", "DataLoaderDispatcher"}:
        raise GradselError("this DataLoader was sharded by accelerator.prepare: accelerate pads the ranks' last "
                           "batches with repeated samples (even_batches) and its batches carry no dataset index, so "
                           "the Fisher would count some samples twice. Estimate on a DataLoader with "
                           "DistributedSampler(dataset, accelerator.num_processes, accelerator.process_index) "
                           "before accelerator.prepare (see examples/accelerate_select_train.py)")


def _local_count(data: Any, reader: Any) -> int | None:
    """How many samples this rank's data holds, when that is known without reading it."""
    from torch.utils.data import DataLoader, IterableDataset

    from .fisher.batches import is_single_batch

    try:
        if is_single_batch(data):
            return reader.size(data)
        if isinstance(data, (list, tuple)):
            return sum(reader.size(b) for b in data)
        if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            bs = data.batch_sampler
            if bs is not None and getattr(bs, "drop_last", False):
                return len(bs) * bs.batch_size
            return len(data.sampler)
    except (GradselError, TypeError):
        return None
    return None


class Shard:
    """This rank's part of the data: the global position of each local sample and which to read.

    Attributes:
        group: the process group.
        places: local position → global position (None when the count could not be known before reading:
            positions are then fixed after the pass, rank after rank).
        subset: the local positions to read (None: all), or an empty tensor when this rank reads nothing.
        num_samples: the global ``num_samples`` asked for (for the warning when the data holds fewer).
        wanted: how many samples ``samples=`` asked for (checked after the reduction), or None.
    """

    def __init__(self, group: Any, places: torch.Tensor | None, subset: torch.Tensor | None,
                 num_samples: int | None, wanted: int | None):
        self.group = group
        self.places = places
        self.subset = subset
        self.num_samples = num_samples
        self.wanted = wanted
        self.stats: dict = {}

    def positions(self, batches: Iterator[tuple[torch.Tensor, Any]]) -> Iterator[tuple[torch.Tensor, Any]]:
        """The same batches, numbered by global position."""
        for index, batch in batches:
            yield (index if self.places is None else self.places[index]), batch

    def reduce(self, sums: dict[str, torch.Tensor] | None, used: int, contributions: list[torch.Tensor],
               used_index: list[torch.Tensor], per_sample: bool) -> tuple[int, list, list]:
        """:func:`reduce_fisher` on this rank's pass; returns ``(used, [contributions], [positions])`` global."""
        index = torch.cat(used_index) if used_index else torch.zeros(0, dtype=torch.int64)
        if self.places is None:  # positions rank after rank, now that every rank's count is known
            counts = _all_gather_ints([used], self.group)[:, 0].tolist()
            index = index + sum(counts[: _dist().get_rank(self.group)])
        rows = (torch.cat(contributions) if contributions else torch.zeros(0, dtype=torch.float64)) \
            if per_sample else None
        total, rows, index, self.stats = reduce_fisher(sums, used, per_sample=rows, sample_index=index,
                                                       group=self.group)
        if self.wanted is not None and total != self.wanted:
            raise GradselError(f"samples= asks for {self.wanted} positions, but the ranks together hold only "
                               f"{total} of them: pass global positions (dataset indices under a "
                               "DistributedSampler) that some rank's data holds")
        return total, ([rows] if rows is not None else []), [index]


def shard_of(data: Any, group: Any, reader: Any, *, subset: torch.Tensor | None = None,
             num_samples: int | None = None, kind: str = "empirical") -> Shard | None:
    """This rank's :class:`Shard` of ``data`` under ``group`` (default: the world group when initialised);
    None for a single process. ``subset`` (global positions) and ``num_samples`` (a global count: the
    first positions) become the local positions to read."""
    group = default_group(group)
    if group is None:
        return None
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    _refuse_accelerate_shard(data)
    sampler = _distributed_sampler(data)
    if sampler is not None:
        if sampler.num_replicas != world or sampler.rank != rank:
            raise GradselError(f"the DataLoader's DistributedSampler has num_replicas={sampler.num_replicas}, "
                               f"rank={sampler.rank}, but this process is rank {rank} of {world} in the group: "
                               "build the sampler with the same group (or pass group=)")
        places = torch.tensor(list(sampler), dtype=torch.int64)
        bs = data.batch_sampler
        if bs is not None and getattr(bs, "drop_last", False):
            places = places[: len(bs) * bs.batch_size]
        # padding: the sampler repeats the first indices so that every rank gets as many; the slot of
        # local sample j is j·world + rank in the padded list, past len(dataset) for a repeat
        real = torch.arange(len(places)) * world + rank < len(sampler.dataset)
        known = True
    else:
        count = _local_count(data, reader)
        counts = _all_gather_ints([-1 if count is None else count], group)[:, 0].tolist()
        known = all(c >= 0 for c in counts)
        if not known:
            if kind == "mc" or subset is not None or num_samples is not None:
                raise GradselError("under a process group, kind='mc', samples= and num_samples= need each sample's "
                                   "global position before reading: use a DataLoader with a DistributedSampler, "
                                   "or give every rank a list of batches or a sized DataLoader")
            return Shard(group, None, None, None, None)
        places = sum(counts[:rank]) + torch.arange(count, dtype=torch.int64)
        real = torch.ones(count, dtype=torch.bool)
    want = real.clone()
    if subset is not None:
        want &= torch.isin(places, subset)
    if num_samples is not None:
        want &= places < num_samples
    local = None if bool(want.all()) else want.nonzero().flatten()
    return Shard(group, places, local, num_samples, None if subset is None else len(subset))


# -- masks ------------------------------------------------------------------------------------------------------

def _digest(name: str, mask: torch.Tensor) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(name.encode())
    h.update(str(tuple(mask.shape)).encode())
    m = mask.detach().to("cpu", torch.bool).contiguous().reshape(-1)
    h.update(m.numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def check_masks_agree(masks: dict[str, torch.Tensor], group: Any = None) -> None:
    """Raise a GradselError naming the first parameter whose mask differs between ranks.

    Each rank hashes each mask (name, shape and values; blake2b, 8 bytes) and the hashes are all-gathered:
    8 bytes per parameter and rank on the wire, one collective. Nothing happens in a single process.
    """
    group = default_group(group)
    if group is None:
        return
    names = list(masks)
    sizes = _all_gather_ints([len(names)], group)[:, 0].tolist()
    if len(set(sizes)) > 1:
        raise GradselError(f"the ranks selected masks for different numbers of parameters ({sizes}): every rank "
                           "must call select with the same model, params= and policy")
    hashes = _all_gather_ints([_digest(n, masks[n]) for n in names], group)
    differ = (hashes != hashes[0]).any(0).nonzero().flatten()
    if len(differ):
        i = int(differ[0])
        ranks = (hashes[:, i] != hashes[0, i]).nonzero().flatten().tolist()
        raise GradselError(f"the masks differ between ranks, first at parameter {names[i]!r} (rank(s) {ranks} differ "
                           "from rank 0): each rank must select from the same reduced Fisher with the same seed, "
                           "policy and options; a custom policy must not use rank-local randomness or data")


# -- DDP ------------------------------------------------------------------------------------------------------

def _is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def for_apply(model: nn.Module, selection: Any) -> nn.Module:
    """The module that ``Selection.apply`` masks: the one inside a DDP wrapper.

    DDP registered its parameters when it was built; a tensor that the selection freezes whole would never
    send its gradient, and the reducer would wait for it. That raises here, unless the wrapper was built
    with ``find_unused_parameters=True``.
    """
    if not _is_ddp(model):
        return unwrap(model)
    if not model.find_unused_parameters:
        inner = model.module
        params = dict(inner.named_parameters())
        newly = [n for n, m in selection.masks.items()
                 if n in params and params[n].requires_grad and not bool(m.any())]
        if newly:
            raise GradselError(
                f"this DDP model was wrapped before the selection, which freezes {len(newly)} whole tensor(s) "
                f"(first {newly[0]!r}) that DDP still expects gradients for. Apply the selection to the model "
                "before wrapping it in DDP (cheapest), or call selection.apply(ddp.module, optimizer) and then "
                "ddp = gradsel.distributed.rewrap(ddp), or wrap with find_unused_parameters=True (works, but "
                "all-reduces zeros for the frozen tensors and searches the graph every step)")
    return model.module


def rewrap(model: nn.Module, **overrides: Any) -> nn.Module:
    """A new DDP wrapper around ``model.module`` with the same settings, registering only the parameters
    that require grad now (e.g. after ``Selection.apply`` froze whole tensors). All ranks must call it.

    Costs one broadcast of the module's parameters and buffers from rank 0 (DDP's init sync) and new
    gradient buckets; the frozen tensors then leave the all-reduce. ``overrides`` go to the constructor.
    """
    if not _is_ddp(model):
        raise GradselError(f"rewrap takes a DistributedDataParallel model, got {type(model).__name__}")
    kwargs = dict(device_ids=model.device_ids, output_device=model.output_device, dim=model.dim,
                  process_group=model.process_group, find_unused_parameters=model.find_unused_parameters,
                  gradient_as_bucket_view=model.gradient_as_bucket_view,
                  bucket_cap_mb=model.bucket_bytes_cap / (1 << 20), static_graph=model.static_graph)
    kwargs.update(overrides)
    # the old wrapper's reducer stays inert (its hooks fire only after its own forward); drop it: ddp = rewrap(ddp)
    return nn.parallel.DistributedDataParallel(model.module, **kwargs)


def rewrap_if_needed(model: nn.Module, handle: Any, **overrides: Any) -> nn.Module:
    """After ``handle.step()``: the same DDP wrapper, or a new one (:func:`rewrap`) when a progressive
    policy (jsdrift) has just taken whole tensors out of training, so that their gradients leave DDP's
    all-reduce. Call it on every rank after every ``handle.step()``: ``ddp = rewrap_if_needed(ddp, handle)``.

    The policies decide identically on every rank (their statistics are reduced across ranks), so every
    rank re-wraps at the same step. A model that is not DDP is returned unchanged.
    """
    controller = getattr(handle, "controller", None)
    if controller is None or not getattr(controller, "needs_rewrap", False):
        return model
    controller.needs_rewrap = False
    if not _is_ddp(model):
        return model
    return rewrap(model, **overrides)


def count_allreduce(model: nn.Module) -> dict:
    """Count what a DDP model all-reduces: registers a comm hook (DDP's default all-reduce, plus counting)
    and returns the dict it updates, ``{"bytes", "buckets"}``, summed over the steps since. For measuring;
    a DDP model takes one comm hook, registered before its first backward."""
    if not _is_ddp(model):
        raise GradselError(f"count_allreduce takes a DistributedDataParallel model, got {type(model).__name__}")
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts = {"bytes": 0, "buckets": 0}

    def hook(group, bucket):
        buf = bucket.buffer()
        counts["bytes"] += buf.numel() * buf.element_size()
        counts["buckets"] += 1
        return allreduce_hook(group, bucket)

    model.register_comm_hook(model.process_group, hook)
    return counts


# -- FSDP2 --------------------------------------------------------------------------------------------------------

def is_fsdp(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) manages ``model`` or one of its submodules; the sharded Fisher, top-k,
    selection and optimizer for such models are in :mod:`gradsel.fsdp`."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded yet
    cls = getattr(fsdp, "FSDPModule", None)
    return cls is not None and any(isinstance(m, cls) for m in model.modules())
