"""gradsel on FSDP2 models (``torch.distributed.fsdp.fully_shard``): sharded Fisher, top-k, optimizer, files.

No rank ever holds the whole model's Fisher or masks:

- :func:`estimate` (what ``gradsel.fisher`` runs on a sharded model) runs the per-layer hooks engine on the
  FSDP2 model itself: one ordinary forward and backward per chunk, during which FSDP2 all-gathers each unit's
  parameters as it always does. The rules form ``Σ_i g_i²`` of each parameter from the layer's captured input
  and output gradient (they need no parameter values), one ``fully_shard`` unit at a time, in the parameter's
  full shape; that unit's sums are then reduce-scattered in FSDP2's own layout (dim 0 cut into
  ``ceil(rows / world)``-row chunks, the last ones shorter or empty, zero padding on the wire) and added to this
  rank's shard before the next unit is formed. Peak extra memory: one unit's full-shape sums.
- the ranks run the same number of chunks (FSDP2's collectives need every rank in every forward): a rank whose
  samples are used up runs its last chunk again and adds nothing.
- :func:`top_k` finds the k-th largest score across ranks by a radix select over the scores' float64 bit
  patterns (8 rounds, each one all-reduce of 256 counts), then breaks ties by global position (parameter order,
  then flat index) with one all-gather of per-rank tie counts: masks equal, element for element, to the
  single-process ``top_k`` over the full Fisher, returned as local shards.
- :class:`ShardedSelection` holds local mask shards; ``save`` gathers them to rank 0, which writes one complete
  ordinary selection file; ``optimizer`` gives a :class:`gradsel.optim.SparseAdamW` over the local shards,
  ``apply`` guards the user's own optimizer on the local shards (masking.py's guard on ``to_local()``);
  ``delta`` gathers the trained tensors one at a time and makes the :class:`gradsel.SparseDelta` on rank 0.

See ``docs/scaling-out.md`` (FSDP2) for costs and what is not supported yet.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import distributed as gd
from .errors import GradselError
from .fisher.result import Fisher
from .masking import MaskHandle, _Entries, _Guard
from .optim import _local
from .policies.base import output_dims, split_budget
from .selection import Selection, resolve_budget

__all__ = ["Layout", "layouts", "ShardedFisher", "estimate", "top_k", "top_rows", "random_rows", "full_rows",
           "ShardedSelection", "select", "sparse_adamw", "local_rows", "position_scores", "random_scores",
           "shard_selection"]

#: samples per chunk when neither ``chunk_size`` nor the data's batches say otherwise
MAX_CHUNK = 32
_SIGN = -(1 << 63)


def _dist():
    import torch.distributed as dist

    return dist


# -- where each parameter's shard lives ---------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """One parameter's FSDP2 layout on this rank: dim 0 cut into chunks of ``chunk`` rows, rank after rank.

    Attributes:
        shape: the parameter's full shape.
        start: the first full-tensor row this rank holds.
        rows: how many rows this rank holds (the last ranks hold fewer, possibly none).
        chunk: rows per rank in the padded layout (``ceil(shape[0] / world)``).
        unit: index of the ``fully_shard`` unit (parameter group) holding the parameter.
        rank: this rank in the shard group; world: the shard group's size.
    """

    shape: tuple
    start: int
    rows: int
    chunk: int
    unit: int
    rank: int
    world: int

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def local_shape(self) -> tuple:
        return (self.rows, *self.shape[1:])

    def rows_of(self, rank: int) -> tuple[int, int]:
        """``(start, rows)`` held by ``rank``."""
        start = min(self.shape[0], rank * self.chunk)
        return start, max(0, min(self.shape[0], (rank + 1) * self.chunk) - start)


def local_rows(full: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's rows of a full-shape tensor (a view)."""
    return full.narrow(0, layout.start, layout.rows)


def _fsdp_params(model: nn.Module) -> tuple[dict[int, Any], dict[int, int]]:
    """``id(sharded parameter) -> FSDPParam`` and ``-> unit index`` over every ``fully_shard`` unit."""
    from torch.distributed.fsdp import FSDPModule

    found, units = {}, {}
    unit = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                found[id(fp.sharded_param)] = fp
                units[id(fp.sharded_param)] = unit
            unit += 1
    return found, units


def _shard_group(fp: Any) -> Any:
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo

    info = fp.mesh_info
    if not isinstance(info, FSDPMeshInfo) or isinstance(info, HSDPMeshInfo) or getattr(fp, "is_dtensor", False):
        raise GradselError("gradsel supports fully_shard on a 1-D device mesh (plain FSDP2); HSDP (a 2-D mesh), "
                           "replicate-only meshes and tensor-parallel DTensor parameters are not supported yet")
    placement = getattr(fp, "fsdp_placement", None)
    if placement is not None and getattr(placement, "dim", 0) != 0:
        raise GradselError(f"a parameter is sharded on dim {placement.dim} (shard_placement_fn): gradsel supports "
                           "FSDP2's default Shard(0) only")
    return info.shard_process_group


def layouts(model: nn.Module, names: list[str]) -> tuple[dict[str, Layout], Any, dict[str, Any]]:
    """Each candidate's :class:`Layout`, the shard process group, and ``name -> FSDPParam``.

    Raises:
        GradselError: a candidate not managed by ``fully_shard``, a layout other than Shard(0) on a 1-D mesh.
    """
    found, units = _fsdp_params(model)
    params = dict(model.named_parameters())
    out, fps, group = {}, {}, None
    for name in names:
        p = params[name]
        fp = found.get(id(p))
        if fp is None:
            raise GradselError(f"parameter {name!r} is not managed by fully_shard (it is replicated or was added "
                               "after wrapping): apply fully_shard to the root module too, so that every parameter "
                               "is sharded, or leave it out with exclude=")
        g = _shard_group(fp)
        if group is None:
            group = g
        elif g is not group and _dist().get_world_size(g) != _dist().get_world_size(group):
            raise GradselError("the fully_shard units use different process groups: gradsel needs one shard group")
        rank, world = fp.mesh_info.shard_mesh_rank, fp.mesh_info.shard_mesh_size
        shape = tuple(p.shape)
        chunk = -(-shape[0] // world) if shape else 1
        start = min(shape[0], rank * chunk)
        rows = max(0, min(shape[0], (rank + 1) * chunk) - start)
        lay = Layout(shape, start, rows, chunk, units[id(p)], rank, world)
        local = tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
        if local != lay.local_shape:
            raise GradselError(f"internal: {name!r} holds a local shard of shape {local} on rank {rank}, gradsel "
                               f"expected {lay.local_shape} (FSDP2's Shard(0) chunks); please report this")
        out[name], fps[name] = lay, fp
    return out, group, fps


# -- the sharded Fisher ---------------------------------------------------------------------------------------

class ShardedFisher(Fisher):
    """A Fisher whose tensors are this rank's shards (FSDP2's Shard(0) rows), not full tensors.

    ``fisher[name]`` is a plain tensor of ``fisher.layouts[name].local_shape``; ``sharded`` is True (a plain
    :class:`~gradsel.fisher.Fisher` has no such attribute: test with ``getattr(f, "sharded", False)``).

    Attributes:
        layouts: name → :class:`Layout` (full shape, rows held here).
        group: the shard process group.
        stats: ``{"collectives", "bytes"}`` this rank sent to reduce-scatter the sums (plus the small
            collectives that keep the ranks in step), and ``"full_bytes"``: the largest full-shape sums held
            at once (one unit's), the most of the Fisher any rank holds beyond its shard.
    """

    sharded = True

    def __init__(self, scores, num_samples, *, layouts: dict[str, Layout], group: Any, stats: dict, **kwargs):
        super().__init__(scores, num_samples, **kwargs)
        self.layouts = layouts
        self.group = group
        self.stats = stats

    def numel(self) -> int:
        """Number of scored elements over all ranks."""
        return sum(math.prod(lay.shape) for lay in self.layouts.values())

    def flat(self) -> torch.Tensor:
        raise GradselError("a sharded Fisher has no flat view on one rank: use gradsel.fsdp.top_k, or gather it "
                           "yourself only for a small model")

    def __repr__(self) -> str:
        world = next(iter(self.layouts.values())).world if self.layouts else 0
        return (f"ShardedFisher({len(self)} tensors, {self.numel():,} elements over {world} ranks, "
                f"num_samples={self.num_samples}, kind={self.kind!r})")


class _Refuse:
    """Stands in for the hooks engine's fallbacks: torch.func does not run through FSDP2's sharded parameters."""

    def __init__(self, model, names, reader):
        raise GradselError(
            f"under FSDP2 gradsel computes the Fisher with per-layer rules only (Linear, Conv1d/2d/3d and their "
            f"transposes, Embedding, LayerNorm, GroupNorm, BatchNorm with running statistics, timm's norm + "
            f"activation layers, transformers' Conv1D); {len(names)} "
            f"candidate(s) need another engine (first {names[0]!r}): torch.func transforms do not run through "
            "FSDP2's sharded parameters. Leave them out (gradsel.select's exclude=, or params= of select and "
            "fisher), or estimate on the model before fully_shard and pass fisher=")


class _LiveParams(Mapping):
    """name → the parameter autograd sees now: FSDP2's unsharded parameter once it exists, else the shard."""

    def __init__(self, model: nn.Module, fps: dict[str, Any]):
        self._plain = dict(model.named_parameters())
        self._fps = fps

    def __getitem__(self, name):
        fp = self._fps.get(name)
        if fp is not None and hasattr(fp, "_unsharded_param"):
            return fp._unsharded_param
        return self._plain[name]

    def __iter__(self):
        return iter(self._plain)

    def __len__(self):
        return len(self._plain)


@contextlib.contextmanager
def _plain_classes(model: nn.Module) -> Iterator[None]:
    """fully_shard gives each unit a class of its own (``FSDPLinear`` from ``(FSDPModule, nn.Linear)``); the
    hooks engine picks its rules by exact class, so while it looks for rule layers each unit wears its
    original class again (nothing runs meanwhile)."""
    from torch.distributed.fsdp import FSDPModule

    swapped = []
    for m in model.modules():
        cls = type(m)
        if isinstance(m, FSDPModule):
            base = next((b for b in cls.__bases__ if not issubclass(b, FSDPModule)), None)
            if base is not None:
                m.__class__ = base
                swapped.append((m, cls))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def _engine(model: nn.Module, names: list[str], reader: Any, fps: dict[str, Any]):
    from .fisher.engines.hooks import HooksEngine

    class _ShardedHooks(HooksEngine):
        name = "hooks-fsdp"

        def _check_samples(self, *args):
            try:
                super()._check_samples(*args)
            finally:
                self._reshard()

        def _expansion_fails(self, *args):
            try:
                return super()._expansion_fails(*args)
            finally:
                self._reshard()

        def _reshard(self):
            # a forward without backward leaves the root unit's parameters unsharded (FSDP2 keeps the root's for
            # the backward it expects): shard them again, as the next call finds the model
            from torch.distributed.fsdp import FSDPModule

            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    with _plain_classes(model):
        run = _ShardedHooks(model, names, reader, _Refuse, _Refuse)
    # modules without rule (local torch.func gradients) and per-sample parameter copies swap parameters
    # through torch.func: not through FSDP2. FSDP2 needs every rank in every forward, so the one-off checks
    # whose count could differ between ranks are skipped (captured tensors are copied: no in-place check), and
    # those that remain run the same forwards on every rank and decide alike (_agree): the check that each rule
    # layer's dim 0 holds the samples (one batch-of-one forward), the pass again with roots for layers the
    # backward did not reach, and the check of batch-shared outputs expanded per sample (the losses, and two
    # one-sample forwards: each copy's gradient is its sample's).
    run.local = {}
    run._read_dim1 = False  # ranks whose sequences differ could read one layer in different layouts
    run.expandable = []
    run._separable = True
    run._clone = True
    run.params = _LiveParams(model, fps)  # autograd's uses are those of the unsharded parameters
    return run


def _reduce_scatter(inp: torch.Tensor, out: torch.Tensor, group: Any) -> None:
    """``out`` = this rank's part of the sum of every rank's ``inp`` (reduce_scatter_tensor)."""
    dist = _dist()
    # torch 2.14 renamed reduce_scatter_tensor (deprecated there) to reduce_scatter_single
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, inp, op=dist.ReduceOp.SUM, group=group)


def _scatter_unit(names: list[str], full: dict[str, torch.Tensor], acc: dict[str, torch.Tensor],
                  lays: dict[str, Layout], group: Any, stats: dict) -> None:
    """Reduce-scatter one unit's full-shape sums (one buffer per dtype) and add this rank's rows to ``acc``."""
    world = lays[names[0]].world
    device = gd._comm_device(group)
    held = sum(t.numel() * t.element_size() for t in full.values())
    stats["full_bytes"] = max(stats.get("full_bytes", 0), held)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for n in names:
        by_dtype.setdefault(full[n].dtype, []).append(n)
    for dtype, ns in by_dtype.items():
        blocks = []
        for n in ns:
            lay = lays[n]
            padded = torch.zeros(world * lay.chunk, lay.row_numel, dtype=dtype, device=device)
            padded[: lay.shape[0]] = full[n].reshape(lay.shape[0], lay.row_numel).to(device)
            blocks.append(padded.reshape(world, lay.chunk * lay.row_numel))
        inp = torch.cat(blocks, 1).reshape(-1)
        out = torch.empty(inp.numel() // world, dtype=dtype, device=device)
        _reduce_scatter(inp, out, group)
        stats["collectives"] += 1
        stats["bytes"] += inp.numel() * inp.element_size()
        start = 0
        for n in ns:
            lay = lays[n]
            part = out[start:start + lay.rows * lay.row_numel]
            acc[n].add_(part.reshape(lay.local_shape).to(acc[n].device))
            start += lay.chunk * lay.row_numel


def _flags(values: list[int], group: Any, stats: dict) -> list[int]:
    dist = _dist()
    t = torch.tensor(values, dtype=torch.int64, device=gd._comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    stats["collectives"] += 1
    stats["bytes"] += t.numel() * 8
    return t.cpu().tolist()


def _raise_collectively(error: BaseException | None, group: Any) -> None:
    """Every rank raises: the failing rank its own error, the others one that names it and quotes it."""
    dist = _dist()
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    rank = next(i for i, m in enumerate(messages) if m is not None)
    raise GradselError(f"rank {rank} failed while estimating the sharded Fisher: {messages[rank]}")


def estimate(model: nn.Module, data: Any, names: list[str], reader: Any, shard: Any, *, masks: dict | None,
             subset: torch.Tensor | None, chunk_size: int | None, kind: str, seed: int, scores: bool,
             engine: str, progress: bool) -> ShardedFisher:
    """``gradsel.fisher`` on an FSDP2 model (called by it): each rank keeps its shard of every parameter's Fisher.

    ``shard`` is this rank's :class:`gradsel.distributed.Shard` of the data; the other arguments are those
    ``gradsel.fisher`` has checked already. See the module docstring for how it is done.
    """
    from tqdm.auto import tqdm

    from .fisher.batches import gather, numbered
    from .fisher.estimate import _accumulate, _warn_unreached, eval_mode

    if engine not in ("auto", "hooks"):
        raise GradselError(f"engine={engine!r} cannot run an FSDP2 model (torch.func and the batch-of-one loop do not "
                           "run through fully_shard's sharded parameters): use engine='auto' or 'hooks'")
    if shard is None or shard.group is None:
        raise GradselError("an FSDP2 model needs an initialised process group")
    lays, group, fps = layouts(model, names)
    dist = _dist()
    if dist.get_world_size(group) != dist.get_world_size(shard.group):
        raise GradselError("the data's process group and the fully_shard group differ in size: pass group= the "
                           "group fully_shard shards over")
    params = dict(model.named_parameters())
    acc_dtype = {n: torch.float64 if params[n].dtype == torch.float64 else torch.float32 for n in names}
    device = {n: params[n].to_local().device if hasattr(params[n], "to_local") else params[n].device for n in names}
    acc = ({n: torch.zeros(lays[n].local_shape, dtype=acc_dtype[n], device=device[n]) for n in names}
           if scores else None)
    flat_masks = None
    if masks is not None:
        flat_masks = {n: None if m is None else torch.as_tensor(m, dtype=torch.bool).reshape(-1).to(device[n])
                      for n, m in masks.items()}
    units: dict[int, list[str]] = {}
    for n in names:
        units.setdefault(lays[n].unit, []).append(n)
    run = _engine(model, names, reader, fps)
    run._agree = lambda needs: [bool(v) for v in _flags([int(b) for b in needs], group, stats)]
    size = chunk_size or MAX_CHUNK

    def chunks() -> Iterator[tuple[torch.Tensor, Any]]:
        batches = numbered(data, reader) if subset is None else gather(data, subset, reader, chunk_size)
        for index, batch in shard.positions(batches):
            for start in range(0, len(index), size):
                rows = index[start:start + size]
                yield rows, reader.take(batch, slice(start, start + len(rows)))

    stats = {"collectives": 0, "bytes": 0, "full_bytes": 0}
    contributions: list[torch.Tensor] = []
    used_index: list[torch.Tensor] = []
    used, last, error = 0, None, None
    source = chunks()
    bar = tqdm(unit="sample", desc="fisher (fsdp)", disable=not progress, leave=False)
    try:
        with eval_mode(model), torch.enable_grad():
            while True:
                item = None
                if error is None:
                    try:
                        item = next(source, None)
                    except Exception as exc:  # a bad batch: every rank stops together below
                        error = exc
                has, never, failed = _flags([int(item is not None), int(last is None and item is None),
                                             int(error is not None)], group, stats)
                if failed:
                    _raise_collectively(error, group)
                if not has:
                    break
                if never:
                    raise GradselError(f"{never} rank(s) hold no samples while others do: under FSDP2 every rank "
                                       "runs every forward, so give each rank at least one sample (a "
                                       "DistributedSampler does)")
                rows, chunk = item if item is not None else last
                real = item is not None
                try:  # the label checks and mc draws run one forward each on every rank, in step
                    reader._logit_shapes = {}
                    reader.check_outputs(model, chunk, rows, classes=kind != "mc")
                    if kind == "mc":
                        chunk = reader.with_sampled_labels(model, chunk, seed, rows)
                except Exception as exc:
                    error = exc
                if _flags([int(error is not None)], group, stats)[0]:
                    _raise_collectively(error, group)
                grads = run(chunk)
                contrib = torch.zeros(len(rows), dtype=torch.float64) if (masks is not None and real) else None
                for unit_names in units.values():
                    full = ({n: torch.zeros(lays[n].shape, dtype=acc_dtype[n], device=device[n]) for n in unit_names}
                            if scores else None)
                    if real and error is None:
                        try:
                            c = _accumulate(full, {n: grads[n] for n in unit_names}, rows, flat_masks, acc_dtype)
                            if contrib is not None and c is not None:
                                contrib += c
                        except GradselError as exc:  # NaN: keep the collectives in step, stop at the next round
                            error = exc
                            if full is not None:
                                full = {n: t.zero_() for n, t in full.items()}
                    if scores:
                        _scatter_unit(unit_names, full, acc, lays, group, stats)
                    del full
                del grads
                if real and error is None:
                    if contrib is not None:
                        contributions.append(contrib)
                    used_index.append(rows)
                    used += len(rows)
                    bar.update(len(rows))
                last = (rows, chunk) if real else last
    finally:
        bar.close()
    used, contributions, used_index = shard.reduce(None, used, contributions, used_index, masks is not None)
    if used == 0:
        raise GradselError("no samples were read from data: check that the loader is not empty "
                           "(and that samples= selects some)")
    means = {n: a.div_(used) for n, a in acc.items()} if acc is not None else {}
    if means:  # a tensor is zero everywhere when every rank's shard of it is
        live = _flags([int(bool(a.any())) for a in means.values()], group, stats)
        _warn_unreached([n for n, f in zip(means, live) if not f], len(means))
    return ShardedFisher(means, used, layouts=lays, group=group, stats=stats, kind=kind,
                         per_sample=torch.cat(contributions) if masks is not None else None,
                         sample_index=torch.cat(used_index), engine=run.name)


# -- global top-k over sharded scores ---------------------------------------------------------------------------

def _keys(t: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys whose signed order is the scores' order (float64 holds float32 and bfloat16 exactly;
    -0.0 counts as 0.0); reversed for ``largest=False``."""
    x = t.detach().reshape(-1).to(torch.float64) + 0.0
    bits = x.view(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    return key if largest else ~key


def _all_reduce_sum(values: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum over ranks of ``values`` (any dtype), back on the CPU."""
    dist = _dist()
    t = values.to(gd._comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu()


def _head_layouts(model: nn.Module, names: list[str], lays: dict[str, Layout]) -> dict[str, Layout]:
    """The layouts as ``granularity="head"`` sees the tensors (:func:`gradsel.policies.base.head_shapes`: an
    attention projection's rows in blocks of one head, a block a row); a GradselError where a rank's shard
    does not hold whole heads (FSDP2's ``ceil(rows / world)``-row chunks cut through one)."""
    from dataclasses import replace

    from .policies.base import head_shapes

    shapes = head_shapes(model, {n: torch.Size(lays[n].shape) for n in names})
    out = {}
    for n in names:
        lay, blocks = lays[n], shapes[n][0] if len(shapes[n]) else 0
        if tuple(shapes[n]) == tuple(lay.shape):
            out[n] = lay
            continue
        per = lay.shape[0] // blocks  # output rows a head
        if lay.chunk % per:  # (the same answer on every rank: the shards start at multiples of the chunk)
            raise GradselError(f"under FSDP2 granularity='head' needs whole heads on each rank; {n!r} has "
                               f"{blocks} heads of {per} rows, and FSDP2 gives each rank {lay.chunk} rows of it: use "
                               "granularity='row', or a world size that divides the heads")
        out[n] = replace(lay, shape=tuple(shapes[n]), start=lay.start // per, rows=lay.rows // per,
                         chunk=lay.chunk // per)
    return out


def full_rows(local: dict[str, torch.Tensor], lays: dict[str, Layout], group: Any = None) -> dict[str, torch.Tensor]:
    """Each tensor's per-row values over its full dim 0, on every rank, from each rank's values for the rows it
    holds (``local[name]``: one value per local row). Each row is one rank's, so one all-reduce of one value a
    row (zeros for the others' rows) gives them all."""
    names = list(local)
    if not names:
        return {}
    flat = torch.zeros(sum(lays[n].shape[0] for n in names), dtype=local[names[0]].dtype)
    offset, spans = 0, {}
    for n in names:
        lay = lays[n]
        flat[offset + lay.start: offset + lay.start + lay.rows] = local[n]
        spans[n] = (offset, lay.shape[0])
        offset += lay.shape[0]
    flat = _all_reduce_sum(flat, group)
    return {n: flat[o:o + r] for n, (o, r) in spans.items()}


def _row_dims(lays: dict[str, Layout], names: list[str]) -> tuple[list, list, dict]:
    """The row units of ``names`` (:func:`gradsel.policies.base.row_units`), (rows, elements per row) of each,
    and the full shapes."""
    from .policies.base import _unit_rows, row_units

    shapes = {n: torch.Size(lays[n].shape) for n in names}
    if any(len(s) == 0 for s in shapes.values()):
        raise GradselError("under FSDP2 granularity='row' takes tensors of one or more dimensions (a scalar has no "
                           "dim 0 to shard): leave scalar candidates out with params=/exclude=")
    units = row_units(shapes)
    return units, [_unit_rows(shapes, u) for u in units], shapes


def _fill_rows(lays: dict[str, Layout], rows: tuple, order: torch.Tensor, k: int, partial) -> tuple[dict, dict]:
    """:func:`gradsel.policies.base.fill_rows` as local masks: rows taken whole in ``order`` (global row numbers,
    the same on every rank) until ``k`` elements, the next one partly; ``partial(unit, local_row, r)`` (called on
    the rank holding that row only) gives ``{name: bool over the row}`` with ``r`` set. FSDP2 cuts dim 0, so each
    row (a weight's output row with its bias entry, or one element of a 1-D tensor) lies on one rank. ``rows``:
    :func:`_row_dims` of the tensors."""
    from .policies.base import rows_taken

    units, dims, shapes = rows
    starts, chosen, whole, remainder = rows_taken(dims, order, k)
    partial_row = None  # (unit index, its row)
    if remainder > 0:
        row = int(order[whole])
        u = max(i for i in range(len(units)) if starts[i] <= row)
        partial_row = (u, row - starts[u])
    masks = {}
    for i, (unit, (total, _)) in enumerate(zip(units, dims)):
        lay = lays[unit[0]]
        picked = chosen[starts[i] + lay.start: starts[i] + lay.start + lay.rows]
        fill = None
        if partial_row is not None and partial_row[0] == i and lay.start <= partial_row[1] < lay.start + lay.rows:
            fill = (partial_row[1] - lay.start, partial(unit, partial_row[1] - lay.start, remainder))
        for n in unit:
            width = shapes[n].numel() // total if total else 0
            mask = picked.reshape(lay.rows, 1).expand(lay.rows, width).clone()
            if fill is not None:
                mask[fill[0]] = fill[1][n]
            masks[n] = mask.reshape(lays[n].local_shape)
    name = None if partial_row is None else f"{units[partial_row[0]][0]}[{partial_row[1]}]"
    return masks, {"rows": starts[-1], "whole_rows": whole, "partial_row": name}


def top_rows(scores: dict[str, torch.Tensor], lays: dict[str, Layout], k: int, *, largest: bool = True,
             group: Any = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Exactly ``k`` elements as whole rows of largest (or smallest) Fisher mass, one row possibly partial, as
    local masks: :func:`gradsel.policies.base.top_rows` over the full tensors, mask for mask. Each rank sums its
    own rows, one all-reduce gives every rank every row's mass (one float64 a row, the only full-size data), every
    rank ranks them alike, and the rank holding the partial row keeps its ``r`` largest (smallest) entries."""
    from .policies.base import _row_view
    from .policies.base import top_k as plain_top_k

    rows = _row_dims(lays, list(scores))
    units = rows[0]
    local = {u[0]: sum(_row_view(scores[n].detach().to("cpu", torch.float64), lays[n].rows).sum(1) for n in u)
             for u in units}  # a unit's rows are its first tensor's (a bias shares its weight's dim 0)
    mass = full_rows(local, lays, group)
    mass = torch.cat([mass[u[0]] for u in units]) if units else torch.zeros(0, dtype=torch.float64)
    if torch.isnan(mass).any():
        raise GradselError("scores contain NaN: the Fisher estimate is broken; check the data and the loss")

    def partial(unit, row, r):  # ties by position, as the one-process partial row
        return plain_top_k({n: _row_view(scores[n].detach(), lays[n].rows)[row] for n in unit}, r, largest=largest)

    return _fill_rows(lays, rows, torch.sort(mass, descending=largest, stable=True).indices, k, partial)


def random_rows(names: list[str], lays: dict[str, Layout], k: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """The unsharded ``random`` policy's ``granularity="row"`` masks, as local masks: its draws are over rows
    (one ``randperm`` of every row, then one of the partial row's elements), which every rank repeats alike
    (8 bytes a row), the rank holding the partial row drawing its elements."""
    gen = torch.Generator().manual_seed(seed)
    rows = units, dims, shapes = _row_dims(lays, names)
    order = torch.randperm(sum(r for r, _ in dims), generator=gen)

    def partial(unit, row, r):  # the same draw as the one-process policy's, split into the unit's tensors
        size = next(s for u, (_, s) in zip(units, dims) if u == unit)
        flat = torch.zeros(size, dtype=torch.bool)
        flat[torch.randperm(size, generator=gen)[:r]] = True
        widths = [shapes[n].numel() // shapes[unit[0]][0] for n in unit]
        return dict(zip(unit, flat.split(widths)))

    return _fill_rows(lays, rows, order, k, partial)


def top_k(scores: dict[str, torch.Tensor], lays: dict[str, Layout], k: int, *, largest: bool = True,
          group: Any = None) -> dict[str, torch.Tensor]:
    """Exactly ``k`` True entries over all ranks' shards at the largest (or smallest) scores, as local masks.

    The same masks, element for element, as :func:`gradsel.policies.top_k` over the full tensors (ties by
    parameter order, then flat index), without gathering the scores: a radix select finds the k-th score
    (8 all-reduces of 256 int64 counts, each a pass over the local scores), then one all-gather of per-rank,
    per-tensor tie counts assigns the ties in global order. Every rank must call it with its own shards.

    Args:
        scores: name → this rank's shard of the scores (rows ``lays[name].start`` onwards).
        lays: name → :class:`Layout`.
        k: how many to select in total.
        largest: the largest (True) or the smallest scores.
        group: the shard process group.
    """
    names = list(scores)
    total = sum(math.prod(lays[n].shape) for n in names)
    if not 0 <= k <= total:
        raise GradselError(f"cannot select {k} of {total} elements")
    nan = _all_reduce_sum(torch.tensor([sum(int(torch.isnan(scores[n]).sum()) for n in names)]), group)
    if int(nan[0]):
        raise GradselError("scores contain NaN: the Fisher estimate is broken; check the data and the loss")
    if k in (0, total):
        return {n: torch.full(lays[n].local_shape, k > 0, dtype=torch.bool) for n in names}
    need, prefix = k, 0
    for shift in range(56, -8, -8):
        hist = torch.zeros(256, dtype=torch.int64)
        for n in names:
            u = _keys(scores[n], largest).cpu() ^ _SIGN  # unsigned order in the bit pattern
            if shift < 56:
                u = u[((u >> (shift + 8)) & ((1 << (56 - shift)) - 1)) == prefix]
            hist += torch.bincount(((u >> shift) & 0xFF), minlength=256)
        counts = _all_reduce_sum(hist, group).tolist()
        above = 0
        for digit in range(255, -1, -1):
            if above + counts[digit] >= need:
                break
            above += counts[digit]
        need -= above
        prefix = (prefix << 8) | digit
    threshold = prefix + _SIGN  # back to the signed key: exactly ``need`` of the ties at it go in
    keys = {n: _keys(scores[n], largest).cpu() for n in names}
    ties = torch.tensor([int((keys[n] == threshold).sum()) for n in names], dtype=torch.int64)
    dist = _dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    out = [torch.empty_like(ties).to(gd._comm_device(group)) for _ in range(world)]
    dist.all_gather(out, ties.to(gd._comm_device(group)), group=group)
    per_rank = torch.stack([o.cpu() for o in out])  # (world, tensors)
    masks = {}
    left = need
    for i, n in enumerate(names):
        mine = 0
        for r in range(world):  # within a tensor, rank r's rows come before rank r+1's
            take = min(left, int(per_rank[r, i]))
            left -= take
            if r == rank:
                mine = take
        mask = keys[n] > threshold
        if mine:
            first = (keys[n] == threshold).nonzero().flatten()[:mine]
            mask[first] = True
        masks[n] = mask.reshape(lays[n].local_shape)
    return masks


# -- selections on shards ---------------------------------------------------------------------------------------

class ShardedSelection(Selection):
    """A :class:`~gradsel.Selection` whose masks are this rank's shards of the FSDP2 parameters.

    ``masks[name]`` has ``layouts[name].local_shape``; ``shapes`` are the full shapes. Counts
    (:meth:`selected`, :meth:`rows`, :meth:`summary`) are reduced across ranks, so every rank must call them;
    :meth:`save` writes one complete file from rank 0; :meth:`gather` returns the full masks.
    """

    sharded = True

    def __init__(self, masks: dict[str, torch.Tensor], *, layouts: dict[str, Layout], group: Any, **kwargs: Any):
        self.layouts = layouts
        self.group = group
        super().__init__(masks, **kwargs)
        self.shapes = {n: tuple(layouts[n].shape) for n in self.masks}

    def _counts(self, names: list[str]) -> list[int]:
        local = torch.tensor([int(self.masks[n].sum()) for n in names], dtype=torch.int64)
        return _all_reduce_sum(local, self.group).tolist() if names else []

    def selected(self) -> int:
        """Selected candidate elements over all ranks (a collective)."""
        return int(sum(self._counts(self.candidates)))

    def total(self) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.candidates)

    def trainable(self) -> int:
        return self.selected() + sum(math.prod(self.shapes[n]) for n in self.always)

    def rows(self, by: str | int = "tensor") -> list[dict]:
        names = self.candidates + self.always
        counts = dict(zip(names, self._counts(names)))
        groups: dict[str, dict] = {}
        for name in names:
            key = name if by == "tensor" else ".".join(name.split(".")[: int(by)])
            if name in self.always:
                key += " (always)"
            row = groups.setdefault(key, {"group": key, "selected": 0, "total": 0})
            row["selected"] += counts[name]
            row["total"] += math.prod(self.shapes[name])
        for row in groups.values():
            row["share"] = row["selected"] / row["total"] if row["total"] else 0.0
        return list(groups.values())

    def summary(self, by: str | int = "tensor", *, markdown: bool = False) -> str:
        return self.gather().summary(by, markdown=markdown)

    def __repr__(self) -> str:  # no collective in a repr
        return (f"ShardedSelection(policy={self.policy!r}, budget={self.budget:,}/{self.total():,}, "
                f"tensors={len(self.candidates)}, always={len(self.always)}, rank {self._rank()})")

    def _rank(self) -> int:
        return _dist().get_rank(self.group)

    def gather(self, dst: int | None = None) -> Selection | None:
        """The full masks as a plain :class:`~gradsel.Selection`: on every rank (``dst=None``, an all-gather),
        or on rank ``dst`` only (a gather; the other ranks get None). One collective of one byte per element."""
        dist = _dist()
        names = list(self.masks)
        device = gd._comm_device(self.group)
        parts = []
        for n in names:
            lay = self.layouts[n]
            buf = torch.zeros(lay.chunk * lay.row_numel, dtype=torch.uint8)
            buf[: lay.rows * lay.row_numel] = self.masks[n].reshape(-1).to(torch.uint8)
            parts.append(buf)
        mine = torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.uint8, device=device)
        world, rank = dist.get_world_size(self.group), self._rank()
        if dst is None:
            bufs = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(bufs, mine, group=self.group)
        else:
            bufs = [torch.empty_like(mine) for _ in range(world)] if rank == dst else None
            dist.gather(mine, bufs, group=self.group, group_dst=dst)
            if rank != dst:
                return None
        bufs = [b.cpu() for b in bufs]
        full, offset = {}, 0
        for n in names:
            lay = self.layouts[n]
            width = lay.chunk * lay.row_numel
            pieces = [bufs[r][offset:offset + lay.rows_of(r)[1] * lay.row_numel] for r in range(world)]
            full[n] = torch.cat(pieces).to(torch.bool).reshape(lay.shape)
            offset += width
        return Selection(full, policy=self.policy, options=self.options, candidates=self.candidates,
                         always=self.always, budget=self.budget, seed=self.seed, info=self.info,
                         policy_object=self._policy_object)

    def save(self, path) -> Path:
        """Gather the masks to rank 0, which writes one complete selection file (as a single process would);
        every rank must call it, and every rank returns the path once the file is written."""
        dist = _dist()
        full = self.gather(dst=0)
        ok = torch.ones(1, dtype=torch.int64)
        error = None
        if full is not None:
            try:
                full.save(path)
            except Exception as exc:
                ok.zero_()
                error = exc
        ok = ok.to(gd._comm_device(self.group))
        dist.broadcast(ok, group=self.group, group_src=0)
        if error is not None:
            raise error
        if not int(ok.cpu()[0]):
            raise GradselError(f"rank 0 could not write the selection file {path}: see rank 0's error")
        return Path(path)

    def apply(self, model: nn.Module, optimizer: Any = None):
        """Train only the selection on the FSDP2 model with the user's own optimizer; returns the handle.

        As :meth:`gradsel.Selection.apply`, on each DTensor parameter's local shard: a post-accumulate-grad
        hook (FSDP2 runs it right after its reduce-scatter) zeroes the local gradient outside the local mask;
        for ``torch.optim.SGD``/``Adam``/``AdamW`` the guard zeroes masked moments and applies weight decay to
        the selected local entries only, any other optimizer gets a per-step transient copy of the partly
        selected local shards. Tensors that no rank selects stop requiring grad on every rank alike. Every rank
        must call it (the per-tensor counts are reduced once).
        """
        if getattr(self.policy_object(), "progressive", False):
            raise GradselError(f"policy {self.policy!r} is progressive: progressive freezing is not supported on "
                               "FSDP2 models yet; train a static selection (fish, reverse, random)")
        return _ShardedHandle(self, model, optimizer)

    def delta(self, model: nn.Module, base_state_dict: Any, *, path: Any = None, base_values: bool = True,
              strict: bool = True):
        """:meth:`gradsel.SparseDelta.from_models` on the FSDP2 model, gathered to rank 0.

        Every rank must call it. Each sharded tensor is gathered in full (``full_tensor``, every rank in the
        same order), one at a time; rank 0 keeps only its changed selected elements, so it never holds the
        whole trained model at once. The delta equals, tensor for tensor, the one a single process makes
        from the same trained weights and the gathered masks.

        Args:
            model: the trained FSDP2 model (sharded).
            base_state_dict: the state dict before training, the same on every rank: either a full one
                (plain tensors, e.g. ``copy.deepcopy(model.state_dict())`` before ``fully_shard``) or FSDP2's
                sharded one (``{k: v.detach().clone() for k, v in model.state_dict().items()}`` of the
                sharded model before training, DTensors; gathered tensor by tensor as well).
            path: also write the delta there, from rank 0 only (the other ranks write nothing); every rank
                returns once the file is written.
            base_values, strict: as in :meth:`~gradsel.SparseDelta.from_models`.

        Returns:
            The :class:`~gradsel.SparseDelta` on rank 0; None on the other ranks.

        Raises:
            GradselError: on every rank together: the model and the base do not match, or (``strict``)
                training changed elements outside the selection.
        """
        from .delta import SparseDelta, _canonical_names, _check_base, _entry

        dist = _dist()
        self.check(model)
        new_sd = model.state_dict()
        _check_base(new_sd, base_state_dict, " (pass the full or the FSDP2 state dict of this model taken before "
                    "training)")
        full = self.gather(dst=0)
        rank = self._rank()
        canonical = _canonical_names(model)
        entries, outside = [], []
        for name in sorted(new_sd):  # the same order on every rank: full_tensor is a collective
            new, base = _full(new_sd[name]), _full(base_state_dict[name])
            if rank == 0:
                mask = full.masks.get(canonical[name]) if name in canonical else None
                entry = _entry(name, new, base, mask, name in canonical, outside)
                if entry is not None:
                    entries.append(entry)
            del new, base
        result, error = None, None
        if rank == 0:
            try:
                result = SparseDelta._assemble(entries, outside, full.metadata(), base_state_dict,
                                               base_values=base_values, strict=strict)
                if path is not None:
                    result.save(path)
            except Exception as exc:
                error = exc
        said = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(said, group=self.group, group_src=0)
        if error is not None:
            raise error
        if said[0] is not None:
            raise GradselError(f"rank 0 could not make the delta: {said[0]}")
        return result

    def optimizer(self, model: nn.Module, lr: float = 1e-3, **kwargs: Any):
        """A :class:`gradsel.optim.SparseAdamW` over this rank's selected elements (see :func:`sparse_adamw`)."""
        return sparse_adamw(self, model, lr, **kwargs)


class _LocalEntries(_Entries):
    """The guard's compact selected entries, read and written on a DTensor's local tensor (its storage)."""

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return super().take(_local(t))

    def put(self, t: torch.Tensor, values: torch.Tensor) -> None:
        super().put(_local(t), values)

    def keep(self, t: torch.Tensor) -> None:
        super().keep(_local(t))


class _ShardGuard(_Guard):
    """:class:`gradsel.masking._Guard` for one FSDP2 parameter: frozen when no rank selects any of its elements
    (the same decision on every rank), else its local mask guards the local shard."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor, *, count: int):
        self.count = count  # selected elements over all ranks
        super().__init__(param, mask)

    def _decide(self, mask: torch.Tensor) -> tuple[bool, _Entries | None]:
        # FSDP2 calls the sharded parameter's post-accumulate-grad hooks (the guard's) after its reduce-scatter
        frozen = self.count == 0
        return frozen, None if frozen or bool(mask.all()) else _LocalEntries(mask)


class _ShardedHandle(MaskHandle):
    """:class:`gradsel.masking.MaskHandle` over FSDP2 local shards (see :meth:`ShardedSelection.apply`)."""

    def __init__(self, selection: ShardedSelection, model: nn.Module, optimizer: Any = None):
        names = list(selection.masks)
        self._counts = dict(zip(names, selection._counts(names)))
        super().__init__(selection, model, optimizer)
        total = sum(math.prod(selection.shapes[n]) for n in names)
        self._share = sum(self._counts.values()) / max(1, total)

    def _guard(self, name: str, param: nn.Parameter, mask: torch.Tensor) -> _Guard:
        local = getattr(param, "_local_tensor", None)
        if local is None:
            raise GradselError(f"parameter {name!r} is not sharded by fully_shard: a ShardedSelection applies to the "
                               "FSDP2 model it was made for (use a plain Selection for an unsharded model)")
        if tuple(local.shape) != tuple(mask.shape):
            raise GradselError(f"{name!r}: this rank holds a shard of shape {tuple(local.shape)}, the selection's "
                               f"mask shard is {tuple(mask.shape)}: the selection was sharded for another layout "
                               "(another world size); shard the full selection again with gradsel.fsdp.shard_selection")
        return _ShardGuard(param, mask.to(local.device), count=self._counts[name])

    @property
    def trainable_share(self) -> float:
        """The share of the masked parameters' elements trained, over all ranks (counted at ``apply``)."""
        return self._share


def _full(t: Any) -> torch.Tensor:
    """A DTensor's full tensor (a collective: every rank calls it in the same order); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sparse_adamw(selection: ShardedSelection, model: nn.Module, lr: float = 1e-3, *, freeze: bool = True,
                 no_decay: Any = None, **kwargs: Any):
    """:func:`gradsel.optim.sparse_adamw` on an FSDP2 model: moments only for this rank's selected elements.

    A tensor is in the optimizer on every rank when any rank holds a selected element of it (a rank holding
    none keeps empty state for it), and ``freeze`` turns off ``requires_grad`` of the tensors no rank selects,
    on every rank alike (FSDP2 reduce-scatters the same gradients on every rank).
    """
    from .optim import build_sparse_adamw

    selection.check(model)
    names = list(selection.masks)
    counts = dict(zip(names, selection._counts(names)))
    masks = {name: (None if counts[name] == math.prod(selection.shapes[name]) else selection.masks[name])
             for name in names if counts[name] > 0}
    kwargs.setdefault("progressive", False)
    return build_sparse_adamw(model, masks, lr, freeze=freeze, no_decay=no_decay, **kwargs)


def select(model: nn.Module, data: Any, pol: Any, *, keep: Any, params: Any, exclude: Any, always: Any,
           fisher: Fisher | None, seed: int, fisher_options: dict) -> ShardedSelection:
    """``gradsel.select`` on an FSDP2 model (called by it); masks are local shards (:class:`ShardedSelection`).

    ``fish`` and ``reverse`` (budget ``"global"`` or ``"per_tensor"``, by element) rank the sharded Fisher with
    :func:`top_k`, per tensor with the one-process split of ``k`` for ``per_tensor``: the one-process masks. By
    row or head (``granularity=``) they rank whole rows with :func:`top_rows`, and ``random`` draws them with
    :func:`random_rows`: the one-process masks too.
    ``random`` ranks :func:`random_scores` (a hash of ``seed`` and the global position), the same masks for any
    world size, though not the unsharded ``random`` policy's (a ``randperm`` over all candidates, which no
    rank of a sharded model should hold)."""
    from .params import resolve

    budget = getattr(pol, "budget", "global")
    granularity = getattr(pol, "granularity", "element")
    rows = granularity in ("row", "head")
    if pol.name not in ("fish", "reverse", "random") or budget not in ("global", "per_tensor") \
            or granularity not in ("element", "row", "head"):
        raise GradselError(f"under FSDP2 gradsel selects with 'fish' or 'reverse' (budget 'global' or 'per_tensor') "
                           f"or 'random', by element, row or head, so far; "
                           f"{pol!r} is not supported on sharded models yet. Select on the model before fully_shard "
                           "(every rank alike) if it fits, and shard the masks with gradsel.fsdp.shard_selection")
    always_names = resolve(model, always, what="always") if always is not None else []
    names = [n for n in resolve(model, params, exclude) if n not in set(always_names)]
    if not names:
        raise GradselError("every candidate is also in always=: nothing is left to rank")
    lays, group, _ = layouts(model, names + always_names)
    total = sum(math.prod(lays[n].shape) for n in names)
    if keep is None:
        keep = pol.default_keep
        if keep is None:
            raise GradselError(f"policy {pol.name!r} needs keep=: a fraction in (0, 1] or an integer count")
    k = resolve_budget(keep, total)
    if pol.name == "random":
        scores = None if rows else random_scores(names, lays, seed)
    else:
        scores = _fisher_shards(model, data, names, lays, fisher, fisher_options)
    largest = pol.name != "reverse"
    info = {}
    if rows:
        with _plain_classes(model):  # (output_dims and head_shapes read modules by their class)
            moved = output_dims(model, names)
            view = _head_layouts(model, names, lays) if granularity == "head" else lays
        if moved:
            raise GradselError(f"under FSDP2 granularity={granularity!r} takes weights whose output rows are on dim "
                               f"0, which FSDP2 shards; {sorted(moved)[0]!r} holds them on dim 1 (transformers' "
                               "Conv1D, a transposed convolution): leave such weights out (params=/exclude=), or "
                               "select before fully_shard and shard the masks with gradsel.fsdp.shard_selection")
        if pol.name == "random":
            masks, info["rows"] = random_rows(names, view, k, seed)
        elif budget == "global":
            scores = {n: scores[n].reshape(view[n].local_shape) for n in names}
            masks, info["rows"] = top_rows(scores, view, k, largest=largest, group=group)
        else:  # each row unit (a weight with its bias) its share of k, as one process splits it
            from .policies.base import row_units

            units = row_units({n: torch.Size(view[n].shape) for n in names})
            parts = split_budget([sum(math.prod(view[n].shape) for n in u) for u in units], k)
            masks, info["rows"] = {}, {"whole_rows": 0, "partial_rows": []}
            for unit, part in zip(units, parts):
                got, one = top_rows({n: scores[n].reshape(view[n].local_shape) for n in unit},
                                    {n: view[n] for n in unit}, part, largest=largest, group=group)
                masks.update(got)
                info["rows"]["whole_rows"] += one["whole_rows"]
                info["rows"]["partial_rows"] += [one["partial_row"]] if one["partial_row"] else []
        masks = {n: masks[n].reshape(lays[n].local_shape) for n in names}
    elif budget == "global":
        masks = top_k(scores, lays, k, largest=largest, group=group)
    else:  # each tensor its share of k (the one-process split), one sharded top-k per tensor
        parts = split_budget([math.prod(lays[n].shape) for n in names], k)
        masks = {}
        for n, part in zip(names, parts):
            masks.update(top_k({n: scores[n]}, {n: lays[n]}, part, largest=largest, group=group))
    for n in always_names:
        masks[n] = torch.ones(lays[n].local_shape, dtype=torch.bool)
    sel = ShardedSelection(masks, layouts=lays, group=group, policy=pol.name, options=pol.options, candidates=names,
                           always=always_names, budget=k, seed=seed, info=info, policy_object=pol)
    got = sel.selected()
    if got != k:
        raise GradselError(f"internal: the sharded top-k selected {got} elements, the budget is {k}; please "
                           "report this")
    return sel


def _fisher_shards(model: nn.Module, data: Any, names: list[str], lays: dict[str, Layout], fisher: Fisher | None,
                   fisher_options: dict) -> dict[str, torch.Tensor]:
    """This rank's rows of the Fisher of each candidate: estimated (sharded), or taken from ``fisher=``."""
    from .fisher import fisher as estimate_fisher

    if fisher is None:
        if data is None:
            raise GradselError("this policy needs Fisher scores: pass data to select() or fisher=")
        fisher = estimate_fisher(model, data, params=names, **fisher_options)
    missing = [n for n in names if n not in fisher]
    if missing:
        raise GradselError(f"fisher= has no scores for {missing[:5]}: estimate it with the same params=")
    scores = {}
    for n in names:
        t = fisher[n]
        if tuple(t.shape) == lays[n].local_shape and getattr(fisher, "sharded", False):
            scores[n] = t
        elif tuple(t.shape) == lays[n].shape:  # a full Fisher (every rank the same): this rank's rows
            scores[n] = local_rows(t, lays[n])
        else:
            raise GradselError(f"fisher= scores for {n!r} have shape {tuple(t.shape)}; the parameter is "
                               f"{lays[n].shape} (this rank's shard {lays[n].local_shape}): they belong to another "
                               "model")
    return scores


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` < 2**32, without int64 overflow (c split into 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3's finalizer) of int64 ``x`` < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def position_scores(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform pseudo-random float64 scores in [0, 2**53) of global element positions (int64 >= 0), a function
    of ``(seed, position)`` alone: any rank computes the scores of its own elements, for any world size."""
    s = _mix32(torch.tensor((int(seed) & _M32) ^ 0x243F6A88) ^ _mix32(torch.tensor(((int(seed) >> 32) & _M32) ^ 0x85A308D3)))
    hi = _mix32((positions >> 32) ^ s)
    h1 = _mix32((positions & _M32) ^ hi)
    h2 = _mix32(h1 ^ 0x9E3779B9)
    return (h1 * (1 << 21) + (h2 >> 11)).to(torch.float64)


def random_scores(names: list[str], lays: dict[str, Layout], seed: int) -> dict[str, torch.Tensor]:
    """This rank's shard of the ``random`` policy's scores under FSDP2: :func:`position_scores` of each element's
    global position (parameter order, then flat index in the full tensor)."""
    out, offset = {}, 0
    for n in names:
        lay = lays[n]
        first = offset + lay.start * lay.row_numel
        local = torch.arange(first, first + lay.rows * lay.row_numel, dtype=torch.int64)
        out[n] = position_scores(local, seed).reshape(lay.local_shape)
        offset += math.prod(lay.shape)
    return out


def shard_selection(selection: Selection, model: nn.Module) -> ShardedSelection:
    """This rank's shards of a full :class:`~gradsel.Selection` (the same on every rank) for an FSDP2 model."""
    names = list(selection.masks)
    lays, group, _ = layouts(model, names)
    selection.check(model)
    masks = {n: local_rows(selection.masks[n], lays[n]).clone() for n in names}
    return ShardedSelection(masks, layouts=lays, group=group, policy=selection.policy, options=selection.options,
                            candidates=selection.candidates, always=selection.always, budget=selection.budget,
                            seed=selection.seed, info=selection.info)
