"""jsdrift: progressive freezing by Jensen–Shannon drift of the Fisher (FisherAdapTune, arXiv 2606.10196).

gradsel's version:

1. Parameter groups: one per tensor (default), ``blocks=B`` row blocks per tensor, ``groups="auto"``
   (module prefixes up to the first layer index: HF encoder layers, timm blocks, smp encoder and decoder
   blocks), or a user mapping ``{group: [names or globs]}``.
2. Every ``interval`` steps a diagonal Fisher per active group: from a fixed probe set with the per-sample
   estimator (``source="probe"``, default), or from the squared mini-batch gradients that training
   computed since the last measurement (``source="train"``: no extra passes, but a batch gradient squared
   is not a per-sample Fisher, and it only sees what the optimizer saw).
3. Each group's Fisher normalised into a probability distribution over its elements, so the distance
   is scale-invariant by construction (the reference code bins log-values into a histogram whose
   bins move when the Fisher is rescaled). Jensen–Shannon distance (base 2, in [0, 1]) to the previous
   measurement, smoothed exponentially.
4. A group freezes when its smoothed drift has been below ``threshold`` for ``patience`` measurements
   (``rule="threshold"``) or below ``mean + lam * std`` of the active groups' drifts
   (``rule="relative"``, ``lam=-1``: one standard deviation steadier than the average), after ``warmup``
   steps, most stable first, while the ``floor`` holds: by default (``floor=1``) the group that drifts
   most stays trainable, so the training loop never runs out of parameters. Frozen stays frozen.
   ``controller.done`` (``handle.done``) says when there is nothing left to decide. With ``anneal=K`` a
   group the rule picks is not frozen at once: its updates are scaled down along a cosine over ``K`` steps
   (FreezeOut's per-layer annealing) and it freezes after them; the decisions treat it as gone meanwhile.
5. Freezing is real: a tensor whose groups are all frozen stops requiring grad (autograd skips its weight
   gradient) and its optimizer state is released; a partly frozen tensor is masked like a static
   selection (its frozen rows never move, under AdamW with weight decay too).
6. History (drift per group per measurement, freeze steps, trainable share, the seconds the signal cost) is
   kept for plots (:func:`plot_drift`), tables (:func:`drift_table`) and checkpoints (``handle.state_dict()``).
7. ``order="network"``: a group may freeze only once every group before it in forward order froze, so the
   frozen part is a prefix of the network and backward stops early. ``preset="fast"`` bundles the cheap
   signal (training gradients on a fixed sample of 4096 elements per group), network order, the plateau
   rule, small groups merged into their neighbours and a fresh judgement after each freeze
   (``docs/jsdrift.md``).
8. Under a process group the drift statistics are reduced across ranks (sums and counts), so every rank
   decides the same; the masks are checked to agree after each measurement, and a freeze that takes whole
   tensors out of training asks for a DDP re-wrap (:func:`gradsel.distributed.rewrap_if_needed`).
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed as _dist
from ..errors import GradselError
from ..fisher import fisher
from ..fisher.batches import BatchReader, iter_batches
from ..report import table
from .base import Context, Policy
from .registry import register_policy

__all__ = ["JSDrift", "js_distance", "plot_drift", "drift_table", "build_groups", "PRESETS", "DEFAULTS"]

_EPS = 1e-30


def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between two non-negative score vectors.

    Each is normalised to sum to one first, so multiplying either by a positive constant changes nothing.
    An all-zero vector counts as uniform.

    >>> import torch
    >>> round(js_distance(torch.tensor([1., 0.]), torch.tensor([0., 5.])), 6)
    1.0
    >>> js_distance(torch.tensor([1., 2., 3.]), torch.tensor([10., 20., 30.]))
    0.0
    """
    p = _normalise(p)
    q = _normalise(q)
    s = p + q
    # KL(p‖m) + KL(q‖m) with m = s/2, as Σ p ln p + Σ q ln q − Σ s ln m: xlogy is 0 where its first argument
    # is, so no masks and no division (2.3× faster on a 14M-element group than indexing the non-zeros)
    kl = torch.xlogy(p, p).sum() + torch.xlogy(q, q).sum() - torch.xlogy(s, s.mul(0.5)).sum()
    return math.sqrt(max(0.0, 0.5 * float(kl) / math.log(2)))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1).double().clamp_min(0)
    total = x.sum()
    if total <= 0:
        return torch.full_like(x, 1.0 / x.numel())
    return x / total


@dataclass
class Group:
    """A named set of parameter elements decided about together: ``(tensor name, row slice or None)``."""

    name: str
    parts: list[tuple[str, tuple[int, int] | None]]

    def gather(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(scores[n] if rows is None else scores[n][rows[0]:rows[1]]).reshape(-1)
                          for n, rows in self.parts])

    def numel(self, shapes: dict[str, tuple]) -> int:
        total = 0
        for n, rows in self.parts:
            shape = shapes[n]
            per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
            total += math.prod(shape) if rows is None else (rows[1] - rows[0]) * per_row
        return total

    def tensors(self) -> list[str]:
        return sorted({n for n, _ in self.parts})

    def flat_ranges(self, shapes: dict[str, tuple]) -> list[tuple[str, int, int]]:
        """``(tensor, first flat index, end)`` per part, in the order :meth:`gather` concatenates them."""
        out = []
        for n, rows in self.parts:
            shape = shapes[n]
            per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
            out.append((n, 0, math.prod(shape)) if rows is None else (n, rows[0] * per_row, rows[1] * per_row))
        return out


def sample_positions(groups: list[Group], shapes: dict[str, tuple], sample: int, seed: int = 0
                     ) -> tuple[dict[str, torch.Tensor], dict[str, list[tuple[str, torch.Tensor]]]]:
    """A fixed random subset of at most ``sample`` elements per group (all of a smaller group's).

    Returns ``(index, parts)``: ``index[tensor]`` the sorted flat indices kept of each tensor (the union over
    its groups), and ``parts[group]`` a list of ``(tensor, positions into index[tensor])`` in the group's
    element order. The subset is drawn uniformly (exactly ``sample`` distinct elements from a group of at most
    ``16 * sample``; from a larger one, ``sample`` draws with replacement, repeats dropped) from a generator
    seeded by ``seed`` and the group's name, so it is the same on every rank, in every process and on resume.
    """
    per_tensor: dict[str, list[torch.Tensor]] = {}
    chosen: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for g in groups:
        ranges = g.flat_ranges(shapes)
        total = sum(e - b for _, b, e in ranges)
        if total <= sample:
            picks = torch.arange(total)
        else:
            gen = torch.Generator().manual_seed((zlib.crc32(g.name.encode()) + 1_000_003 * int(seed)) % 2 ** 63)
            if total <= 16 * sample:  # exactly `sample` distinct elements
                picks = torch.randperm(total, generator=gen)[:sample].sort().values
            else:  # without a permutation of a huge group: draws with replacement, repeats (< 4%) dropped
                picks = torch.randint(0, total, (sample,), generator=gen).unique()  # sorted
        offset, kept = 0, []
        for n, b, e in ranges:
            local = picks[(picks >= offset) & (picks < offset + e - b)] - offset + b
            offset += e - b
            per_tensor.setdefault(n, []).append(local)
            kept.append((n, local))
        chosen[g.name] = kept
    index = {n: torch.cat(v).sort().values for n, v in per_tensor.items()}
    parts = {name: [(n, torch.searchsorted(index[n], local)) for n, local in kept] for name, kept in chosen.items()}
    return index, parts


_INDEX = re.compile(r"^\d+$")


def _auto_key(name: str) -> str:
    """Module prefix up to the first integer component (a layer / block index), else the first two parts."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if _INDEX.match(p):
            return ".".join(parts[: i + 1])
    return ".".join(parts[: min(2, len(parts) - 1)]) or name


def build_groups(candidates: list[str], shapes: dict[str, tuple], groups: Any = "tensor",
                 blocks: int = 1, min_size: int = 0) -> list[Group]:
    """The groups for ``groups=`` / ``blocks=`` over ``candidates`` (every candidate in exactly one group).

    With ``min_size`` > 0 (``"tensor"`` and ``"auto"`` only; a dict's groups are the user's), a group of fewer
    elements joins the group before it in model order (the first one joins the next), keeping that group's
    name: a BatchNorm beside its conv, a small head with the block before it.
    """
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
        raise GradselError(f"min_group must be a non-negative int (elements), got {min_size!r}")
    if min_size and not isinstance(groups, dict):
        return _merge_small(build_groups(candidates, shapes, groups, blocks), shapes, min_size)
    if blocks < 1:
        raise GradselError(f"blocks must be a positive integer, got {blocks}")
    if isinstance(groups, dict):
        out, taken = [], {}
        for gname, specs in groups.items():
            specs = [specs] if isinstance(specs, str) else list(specs)
            members = [n for n in candidates if any(n == s or n.startswith(s + ".") or fnmatch.fnmatchcase(n, s)
                                                   for s in specs)]
            if not members:
                raise GradselError(f"group {gname!r} ({specs}) matches no candidate parameter")
            for n in members:
                if n in taken:
                    raise GradselError(f"parameter {n!r} is in two groups: {taken[n]!r} and {gname!r}")
                taken[n] = gname
            out.append(Group(gname, [(n, None) for n in members]))
        rest = [n for n in candidates if n not in taken]
        return out + [Group(n, [(n, None)]) for n in rest]
    if groups == "auto":
        keyed: dict[str, list[str]] = {}
        for n in candidates:
            keyed.setdefault(_auto_key(n), []).append(n)
        return [Group(k, [(n, None) for n in ns]) for k, ns in keyed.items()]
    if groups != "tensor":
        raise GradselError(f"groups={groups!r} is not known: use 'tensor', 'auto' or a dict name -> [patterns]")
    out = []
    for n in candidates:
        rows = shapes[n][0] if len(shapes[n]) else 1
        if blocks == 1 or len(shapes[n]) == 0 or rows < blocks:
            out.append(Group(n, [(n, None)]))
            continue
        edges = [round(i * rows / blocks) for i in range(blocks + 1)]
        out += [Group(f"{n}[{i}/{blocks}]", [(n, (edges[i], edges[i + 1]))]) for i in range(blocks)]
    return out


def _merge_small(groups: list[Group], shapes: dict[str, tuple], min_size: int) -> list[Group]:
    out: list[Group] = []
    carry: list = []
    for g in groups:
        parts = carry + g.parts
        if Group(g.name, parts).numel(shapes) < min_size:
            if out:
                out[-1] = Group(out[-1].name, out[-1].parts + parts)
            else:
                carry = parts  # nothing before it: it joins the next group
            continue
        carry = []
        out.append(Group(g.name, parts))
    if carry:  # everything was small
        out.append(Group(groups[0].name, carry))
    return out


def _take_probe(data: Any, num: int, reader: BatchReader) -> list:
    """The first ``num`` samples of ``data`` as a fixed list of batches."""
    out, have = [], 0
    for batch in iter_batches(data):
        reader.check(batch)
        n = reader.size(batch)
        if have + n > num:
            batch = reader.take(batch, slice(0, num - have))
            n = num - have
        out.append(batch)
        have += n
        if have >= num:
            break
    if have == 0:
        raise GradselError("jsdrift needs probe data: pass data to select() or probe=")
    return out


#: elements per group that ``preset="fast"`` measures (``sample=``)
SAMPLE = 4096

#: groups smaller than this join a neighbour under ``preset="fast"`` (``min_group=``)
MIN_GROUP = 1024

#: the options' values when neither the call nor a preset sets them
DEFAULTS: dict[str, Any] = dict(interval=10, source="probe", probe_samples=32, groups="tensor", blocks=1,
                                smoothing=0.5, rule="threshold", threshold=0.05, lam=-1.0, tol=0.05, patience=2,
                                warmup=0, floor=1, order="any", window=None, sample="all",
                                min_group=0, recheck=False, anneal=0)

#: named option sets; options given explicitly override the preset's
PRESETS: dict[str, dict[str, Any]] = {
    # cheap signal (squared training gradients of the last 3 steps before each measurement), freezing
    # from the input side, a group freezing once its smoothed drift stops falling by 5% a measurement
    "fast": dict(source="train", window=3, order="network", rule="plateau", tol=0.05, groups="auto",
                 interval=10, patience=2, smoothing=0.5, sample=SAMPLE, min_group=MIN_GROUP,
                 recheck=True),
}


@register_policy("jsdrift")
class JSDrift(Policy):
    """Progressive freezing of parameter groups whose Fisher distribution has stopped drifting.

    Every option left out takes the ``preset``'s value, else :data:`DEFAULTS`'s.

    Options:
        preset: None or a name in :data:`PRESETS` (``"fast"``: training-gradient signal, network order,
            plateau rule, groups per block).
        interval: steps between Fisher measurements.
        source: ``"probe"`` (per-sample Fisher on a fixed probe set) or ``"train"`` (training gradients).
        window: with ``source="train"``, how many of the ``interval`` steps before each measurement have
            their gradients squared (default: all of them); fewer costs proportionally less.
        sample: ``"all"`` (every element, exact) or how many elements per group are measured: a fixed random
            subset, the same at every measurement and on every rank; the drift is then the JS distance of
            the group's Fisher distribution restricted to those elements (``docs/jsdrift.md``).
        probe: batches for the probe set (default: the data given to ``select``).
        probe_samples: how many probe samples to keep.
        groups: ``"tensor"``, ``"auto"`` or a dict group name → list of names / prefixes / globs.
        blocks: split each tensor into this many row blocks (with ``groups="tensor"``).
        min_group: with ``groups="tensor"`` or ``"auto"``, a group of fewer elements joins the group before it
            in model order (0, the default: no merging). A tiny group's drift is noise-dominated and, under
            ``order="network"``, would hold up every group after it.
        smoothing: weight of the newest distance in the exponential smoothing (1 = no smoothing).
        rule: ``"threshold"``, ``"relative"`` or ``"plateau"``.
        threshold: drift below which a group counts as stable (``rule="threshold"``).
        lam: with ``rule="relative"``, stable means below ``mean + lam * std`` of the active groups.
        tol: with ``rule="plateau"``, stable means the smoothed drift fell by less than this share since
            the last measurement (or rose): it has stopped improving.
        patience: consecutive stable measurements before a group freezes.
        warmup: no freezing before this step.
        floor: what always stays trainable, the groups that drift most: an int is a number of groups
            (default 1), a float in [0, 1] a share of candidate elements (like ``keep=``: ``1`` is one
            group, ``1.0`` everything). ``0`` lets every group freeze (a warning then says so).
        order: ``"any"`` (a stable group freezes whatever its place) or ``"network"`` (only once every
            group before it in forward order froze: the frozen part is a prefix and backward stops early).
        recheck: after a freeze, every group still trainable must again be stable for ``patience``
            measurements before it may freeze (its gradients changed when the groups before it stopped
            training), so a prefix grows by one step of groups per ``patience`` measurements.
        anneal: steps over which a group the rule picked keeps training with its updates scaled by
            ``(1 + cos(pi * j / (anneal + 1))) / 2`` at its ``j``-th step, before it freezes (0, the default:
            it freezes at once). Meanwhile the decisions count it as frozen (the floor, network order and
            ``recheck`` see it gone). Needs the optimizer: ``selection.apply(model, optimizer)``.
    """

    progressive = True
    default_keep = 1.0

    def __init__(self, interval: int | None = None, source: str | None = None, probe: Any = None,
                 probe_samples: int | None = None, groups: Any = None, blocks: int | None = None,
                 smoothing: float | None = None, rule: str | None = None, threshold: float | None = None,
                 lam: float | None = None, patience: int | None = None, warmup: int | None = None,
                 floor: int | float | None = None, order: str | None = None, tol: float | None = None,
                 window: int | None = None, preset: str | None = None, sample: int | str | None = None,
                 min_group: int | None = None, recheck: bool | None = None, anneal: int | None = None):
        if preset is not None and preset not in PRESETS:
            raise GradselError(f"preset={preset!r} is not known: use one of {sorted(PRESETS)} or leave it out")
        given = dict(interval=interval, source=source, probe_samples=probe_samples, groups=groups, blocks=blocks,
                     smoothing=smoothing, rule=rule, threshold=threshold, lam=lam, patience=patience,
                     warmup=warmup, floor=floor, order=order, tol=tol, window=window, sample=sample,
                     min_group=min_group, recheck=recheck, anneal=anneal)
        o = dict(DEFAULTS)
        o.update(PRESETS.get(preset, {}))
        o.update({k: v for k, v in given.items() if v is not None})
        if o["source"] not in ("probe", "train"):
            raise GradselError(f"source={o['source']!r} is not known: use 'probe' or 'train'")
        if o["rule"] not in ("threshold", "relative", "plateau"):
            raise GradselError(f"rule={o['rule']!r} is not known: use 'threshold', 'relative' or 'plateau'")
        if o["order"] not in ("any", "network"):
            raise GradselError(f"order={o['order']!r} is not known: use 'any' (default) or 'network' (freeze from "
                               "the input side only)")
        if not (isinstance(o["interval"], int) and o["interval"] >= 1):
            raise GradselError(f"interval must be a positive integer, got {o['interval']!r}")
        if o["window"] is None:
            o["window"] = o["interval"]
        if not (isinstance(o["window"], int) and 1 <= o["window"]):
            raise GradselError(f"window must be a positive integer (steps squared before each measurement), got "
                               f"{o['window']!r}")
        o["window"] = min(o["window"], o["interval"])
        if o["sample"] != "all" and (isinstance(o["sample"], bool) or not isinstance(o["sample"], int)
                                     or o["sample"] < 2):
            raise GradselError(f"sample must be 'all' (measure every element) or an int >= 2 (elements measured per "
                               f"group), got {o['sample']!r}")
        if not 0.0 < o["smoothing"] <= 1.0:
            raise GradselError(f"smoothing must be in (0, 1], got {o['smoothing']}")
        if not 0.0 <= o["tol"] < 1.0:
            raise GradselError(f"tol must be in [0, 1) (the smoothed drift's relative fall that counts as still "
                               f"improving), got {o['tol']}")
        if not isinstance(o["recheck"], bool):
            raise GradselError(f"recheck must be True or False, got {o['recheck']!r}")
        if isinstance(o["anneal"], bool) or not isinstance(o["anneal"], int) or o["anneal"] < 0:
            raise GradselError(f"anneal must be a number of steps (int >= 0; 0 freezes a group as soon as the rule "
                               f"picks it), got {o['anneal']!r}")
        _check_floor(o["floor"])
        super().__init__(**o, **({"preset": preset} if preset is not None else {}))
        self.probe = probe
        self.fisher_options: dict = {}

    def select(self, ctx: Context) -> dict[str, torch.Tensor]:
        if ctx.k != ctx.total:
            raise GradselError("jsdrift starts with every candidate trainable and freezes groups during training: "
                               "leave keep= out (or 1.0) and set floor= for the least trainable share")
        groups = build_groups(ctx.candidates, ctx.shapes, self.options["groups"], self.options["blocks"],
                              self.options.get("min_group", 0))
        _check_floor(self.options["floor"], len(groups))
        opts = dict(ctx.fisher_options)
        self.fisher_options = {k: opts.get(k) for k in ("loss", "forward", "chunk_size", "kind", "seed")}
        if self.options["source"] == "probe":
            source = self.probe if self.probe is not None else ctx.data
            reader = BatchReader(opts.get("forward"), opts.get("loss"))
            self.probe = _take_probe(source, self.options["probe_samples"], reader)
        return {n: torch.ones(s, dtype=torch.bool) for n, s in ctx.shapes.items()}

    def controller(self, selection, model: nn.Module, handle) -> "DriftController":
        if self.options["source"] == "probe" and self.probe is None:
            raise GradselError("this jsdrift policy has no probe set (a loaded selection keeps none): build it with "
                               "gradsel.select(model, data, 'jsdrift', ...) or pass probe=")
        return DriftController(self, selection, model, handle)


def _check_floor(floor: Any, groups: int | None = None) -> None:
    """``floor`` must be a group count (int >= 0, at most the number of groups) or a share in [0, 1]."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)):
        raise GradselError(f"floor must be a number of groups (int, e.g. 1) or a share of candidate elements "
                           f"(float in [0, 1], e.g. 0.1), got {floor!r}")
    if isinstance(floor, int):
        if floor < 0:
            raise GradselError(f"floor={floor} groups is negative: pass 0 (let everything freeze) or more")
        if groups is not None and floor > groups:
            raise GradselError(f"floor={floor} groups, but jsdrift forms only {groups} groups here, so nothing "
                               "could ever freeze: pass a smaller count, a share such as floor=0.5, or finer "
                               "groups (blocks=)")
    elif not 0.0 <= floor <= 1.0:
        raise GradselError(f"floor={floor} is outside [0, 1]: a float floor is a share of candidate elements "
                           "(an int is a number of groups)")


class DriftController:
    """Measures drift every ``interval`` steps and freezes stable groups through the handle.

    Public: :attr:`done`, :attr:`needs_rewrap`, ``on_freeze`` (callbacks called with each freeze event),
    :meth:`trainable_share`, :meth:`trainable_elements`, :meth:`trainable_groups`, :meth:`network_order`,
    ``frozen`` (group → step it froze), ``history``, ``state_dict()`` / ``load_state_dict()``.
    :meth:`step` returns the freeze event of that step (a dict: ``step``, ``groups``, ``tensors`` that left
    training whole) or None.
    """

    def __init__(self, policy: JSDrift, selection, model: nn.Module, handle):
        self.policy = policy
        self.o = policy.options
        self.selection = selection
        self.model = model
        self.handle = handle
        self.shapes = {n: tuple(selection.shapes[n]) for n in selection.candidates}
        self.groups = build_groups(selection.candidates, self.shapes, self.o["groups"], self.o["blocks"],
                                   self.o.get("min_group", 0))
        self.sizes = {g.name: g.numel(self.shapes) for g in self.groups}
        self._by_name = {g.name: g for g in self.groups}
        self.total = sum(self.sizes.values())
        self.step_count = 0
        self.prev: dict[str, torch.Tensor] = {}
        self.smoothed: dict[str, float] = {}
        self.prev_smoothed: dict[str, float] = {}
        self.stable: dict[str, int] = {}
        self.frozen: dict[str, int] = {}  # group -> step it froze
        self.annealing: dict[str, int] = {}  # group -> step the rule picked it (anneal=): frozen anneal steps later
        self.history: dict[str, Any] = {"steps": [], "drift": {}, "smoothed": {}, "share": [], "frozen": self.frozen,
                                        "anneal_from": {}, "signal_time": 0.0, "probe_time": 0.0}
        if self.o.get("anneal", 0) and getattr(handle, "optimizer", None) is None:
            raise GradselError(f"jsdrift anneal={self.o['anneal']} scales a group's updates after the optimizer's "
                               "step, so it needs the optimizer: selection.apply(model, optimizer) (under the HF "
                               "Trainer or Lightning, a dense optimizer, not SparseAdamW), or leave anneal out")
        #: callables called with each freeze event (``{"step", "groups", "tensors"}``), e.g. to re-wrap DDP
        self.on_freeze: list = []
        #: True after a freeze took whole tensors out of training, until :func:`gradsel.distributed.rewrap_if_needed`
        #: (or the user) re-wrapped the DDP model and set it back to False
        self.needs_rewrap = False
        _check_floor(self.o["floor"], len(self.groups))
        self._order: list[str] | None = None  # tensor names in forward order (order="network")
        self._order_hooks: list = []
        if self.o.get("order", "any") == "network":
            self._record_order()
        self._adopt_frozen()
        # sample=k: the flat indices measured per tensor and, per group, its positions among them (None: all)
        self._index: dict[str, torch.Tensor] | None = None
        self._parts: dict[str, list[tuple[str, torch.Tensor]]] = {}
        if self.o.get("sample", "all") != "all":
            self._index, self._parts = sample_positions(self.groups, self.shapes, self.o["sample"],
                                                        policy.fisher_options.get("seed") or 0)
        self._buffers: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, Any] = {}
        self._counted = 0  # training steps squared into the buffers since the last measurement
        self._counted_tensors: set[str] = set()  # tensors squared during the current step
        self._hook_time = 0.0
        self._collect = self._collecting(1)
        if self.o["source"] == "train":
            self._attach_train_hooks()
        else:
            self._measure()  # the baseline distribution at step 0
        selection.info["jsdrift"] = self.history

    def _adopt_frozen(self) -> None:
        """Groups the selection's masks already leave out (a selection applied again, or loaded) stay frozen."""
        before = self.selection.info.get("jsdrift", {}).get("frozen", {})
        for g in self.groups:
            parts = [self.selection.masks[n] if rows is None else self.selection.masks[n][rows[0]:rows[1]]
                     for n, rows in g.parts]
            if not any(bool(m.any()) for m in parts):
                self.frozen[g.name] = int(before.get(g.name, 0))
            elif not all(bool(m.all()) for m in parts):
                raise GradselError(f"the selection's mask of jsdrift group {g.name!r} is partly False: jsdrift "
                                   "trains a group whole or freezes it whole, and its masks were changed outside "
                                   "it. Make a fresh selection with gradsel.select(..., 'jsdrift')")
        self.selection.budget = self.trainable_elements()
        if self.frozen and not self._active():
            self._warn_nothing_left()

    def _warn_nothing_left(self) -> None:
        rest = (" (only the always= parameters still train)" if self.selection.always
                else ": the next loss.backward() raises")
        warnings.warn(f"jsdrift froze its last group at step {self.step_count}: no candidate parameter is left to "
                      f"update{rest}. Stop the training loop when handle.done is True (the HF callback does), or "
                      "keep a floor (floor=1, the default, leaves the group that drifts most trainable)",
                      stacklevel=7)

    # -- network order ---------------------------------------------------------------------------------
    def _record_order(self) -> None:
        """Forward pre-hooks on the modules that own candidates: the first forward (the probe's baseline
        or the first training step) records the order in which they run; the hooks go at the first step."""
        seen: list[str] = []
        candidates = set(self.shapes)

        for mname, module in self.model.named_modules():
            own = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
            own = [n for n in own if n in candidates]
            if not own:
                continue

            def pre(mod, args, own=own):
                for n in own:
                    if n not in seen_set:
                        seen_set.add(n)
                        seen.append(n)

            self._order_hooks.append(module.register_forward_pre_hook(pre))
        seen_set: set[str] = set()
        self._seen = seen

    def _finish_order(self) -> None:
        if self._order is not None or self.o.get("order", "any") != "network":
            return
        for h in self._order_hooks:
            h.remove()
        self._order_hooks = []
        seen = getattr(self, "_seen", [])
        # tensors no forward pre-hook saw (used by a module that does not own them) go last, in model order
        self._order = list(seen) + [n for n in self.selection.candidates if n not in set(seen)]

    def network_order(self) -> list[str]:
        """Group names in forward order (``order="network"``): a group's place is the first forward call of
        a module that owns one of its tensors; groups at the same place (a weight and its bias, row blocks)
        share a tier and may freeze in any order among themselves."""
        return [g.name for g in sorted(self.groups, key=self._tier)]  # sorted() is stable: group order in a tier

    def _tier(self, g: Group) -> int:
        order = self._order if self._order is not None else (list(getattr(self, "_seen", [])) or
                                                            list(self.selection.candidates))
        place = {n: i for i, n in enumerate(order)}
        rest = len(order)
        return min(place.get(n, rest + self.selection.candidates.index(n)) for n in g.tensors())

    # -- measurement ---------------------------------------------------------------------------------
    def _active(self) -> list[Group]:
        """The groups still judged: neither frozen nor annealing towards a freeze."""
        return [g for g in self.groups if g.name not in self.frozen and g.name not in self.annealing]

    def _collecting(self, step: int) -> bool:
        """Whether the gradients of training step ``step`` (1-based) are squared (``window`` before each
        measurement)."""
        interval, window = self.o["interval"], self.o.get("window") or self.o["interval"]
        return (step - 1) % interval >= interval - window

    def _attach_train_hooks(self) -> None:
        """Sum the squared (masked) training gradients of every active tensor between measurements (with
        ``sample=``, of its sampled elements only, into a buffer of their size)."""
        params = dict(self.model.named_parameters())
        for name in sorted({n for g in self._active() for n in g.tensors()} - set(self._hooks)):
            index = None if self._index is None else self._index[name].to(params[name].device)
            self._buffers[name] = (torch.zeros_like(params[name], dtype=torch.float32) if index is None else
                                   torch.zeros(index.numel(), dtype=torch.float32, device=params[name].device))

            def add(q, name=name, index=index, buf=self._buffers[name]):
                if q.grad is not None and self._collect:
                    t0 = time.perf_counter()
                    g = q.grad.detach()
                    if index is not None:
                        g = torch.take(g, index)  # logical (row-major) flat order whatever the memory layout
                    g = g if g.dtype == torch.float32 else g.float()
                    buf.addcmul_(g, g)
                    self._hook_time += time.perf_counter() - t0
                    self._counted_tensors.add(name)

            self._hooks[name] = params[name].register_post_accumulate_grad_hook(add)

    def _scores(self) -> dict[str, torch.Tensor]:
        names = sorted({n for g in self._active() for n in g.tensors()})
        if self.o["source"] == "train":
            scores = {n: self._buffers[n].clone() for n in names}
            for b in self._buffers.values():
                b.zero_()
            count = self._counted
            self._counted = 0
            # under a process group each rank squared its own gradients: add the ranks' sums (and counts)
            _dist.reduce_fisher(scores, count)
            return scores
        opts = {k: v for k, v in self.policy.fisher_options.items() if v is not None}
        t0 = time.perf_counter()
        out = dict(fisher(self.model, self.policy.probe, params=names, progress=False, **opts))
        self.history["probe_time"] = self.history.get("probe_time", 0.0) + time.perf_counter() - t0
        if self._index is not None:
            out = {n: torch.take(out[n], self._index[n].to(out[n].device)) for n in names}
        return out  # under a process group gradsel.fisher already reduced the ranks' sums and counts

    def _gather(self, g: Group, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The group's (sampled) scores as one vector, in a fixed element order."""
        if self._index is None:
            return g.gather(scores)
        return torch.cat([scores[n][pos.to(scores[n].device)] for n, pos in self._parts[g.name]])

    def _measure(self) -> dict | None:
        active = self._active()
        if not active:
            return None
        t0 = time.perf_counter()
        scores = self._scores()
        record = {}
        for g in active:
            dist = _normalise(self._gather(g, scores)).float()
            if g.name in self.prev:
                d = js_distance(self.prev[g.name], dist)
                a = self.o["smoothing"]
                if g.name in self.smoothed:
                    self.prev_smoothed[g.name] = self.smoothed[g.name]
                self.smoothed[g.name] = d if g.name not in self.smoothed else a * d + (1 - a) * self.smoothed[g.name]
                record[g.name] = d
            self.prev[g.name] = dist
        event = None
        if record:
            self.history["steps"].append(self.step_count)
            for g in active:
                if g.name in record:
                    self.history["drift"].setdefault(g.name, []).append([self.step_count, record[g.name]])
                    self.history["smoothed"].setdefault(g.name, []).append([self.step_count, self.smoothed[g.name]])
            event = self._decide(active)
        self.history["share"].append([self.step_count, self.trainable_share()])
        _dist.check_masks_agree({n: self.selection.masks[n] for n in self.selection.candidates})
        self.history["signal_time"] = self.history.get("signal_time", 0.0) + time.perf_counter() - t0
        return event

    def _is_stable(self, name: str, limit: float) -> bool:
        d = self.smoothed[name]
        if self.o["rule"] == "plateau":
            if name not in self.prev_smoothed:
                return False  # needs two smoothed values to see a trend
            return d >= (1.0 - self.o.get("tol", 0.05)) * self.prev_smoothed[name]
        return d < limit

    def _decide(self, active: list[Group]) -> dict | None:
        drifts = {g.name: self.smoothed[g.name] for g in active if g.name in self.smoothed}
        if not drifts:
            return None
        if self.o["rule"] == "relative":
            vals = torch.tensor(list(drifts.values()), dtype=torch.float64)
            limit = float(vals.mean() + self.o["lam"] * (vals.std() if len(vals) > 1 else 0.0))
        else:
            limit = self.o["threshold"]
        for name in drifts:
            self.stable[name] = self.stable.get(name, 0) + 1 if self._is_stable(name, limit) else 0
        if self.step_count < self.o["warmup"]:
            return None
        ready = {name for name in drifts if self.stable[name] >= self.o["patience"]}
        trainable, count = sum(self.sizes[g.name] for g in active), len(active)
        to_freeze = []
        if self.o.get("order", "any") == "network":
            self._finish_order()
            tiers: dict[int, list[str]] = {}
            for g in active:
                tiers.setdefault(self._tier(g), []).append(g.name)
            for t in sorted(tiers):  # from the input side: a tier opens once every tier before it froze
                names = sorted((n for n in tiers[t] if n in ready), key=lambda n: (drifts[n], n))
                for name in names:
                    if not self._floor_allows(trainable - self.sizes[name], count - 1):
                        break
                    trainable -= self.sizes[name]
                    count -= 1
                    to_freeze.append(name)
                if any(n not in to_freeze for n in tiers[t]):
                    break
                if to_freeze and self.o.get("recheck", False):
                    break  # the next tier is judged again once this one stopped training
        else:
            order = sorted((d, i, name) for i, (name, d) in enumerate(drifts.items()) if name in ready)
            for _, _, name in order:  # most stable first: the floor keeps the groups that drift most
                if not self._floor_allows(trainable - self.sizes[name], count - 1):
                    break
                trainable -= self.sizes[name]
                count -= 1
                to_freeze.append(name)
        if to_freeze:
            if self.o.get("recheck", False):
                for g in active:  # the rest measured a regime that just ended: they must settle again
                    self.stable[g.name] = 0
            if self.o.get("anneal", 0):
                for name in to_freeze:  # trained on with shrinking updates; step() freezes them
                    self.annealing[name] = self.step_count
                    self.history["anneal_from"][name] = self.step_count
                    self.prev.pop(name, None)
                return None
            return self._freeze(to_freeze)
        return None

    def _floor_allows(self, elements: int, groups: int) -> bool:
        """Whether ``elements`` trainable candidate elements in ``groups`` groups satisfy the floor."""
        floor = self.o["floor"]
        if isinstance(floor, int):
            return groups >= floor
        return elements / self.total >= floor

    def _freeze(self, names: list[str]) -> dict:
        masks: dict[str, torch.Tensor] = {}
        for gname in names:
            self.frozen[gname] = self.step_count
            self.prev.pop(gname, None)
            for n, rows in self._by_name[gname].parts:
                m = masks.setdefault(n, self.selection.masks[n].clone())
                if rows is None:
                    m[:] = False
                else:
                    m[rows[0]:rows[1]] = False
        self.handle.update(masks)
        self.selection.budget = self.trainable_elements()  # budget == selected(): the elements trained now
        whole = sorted(n for n, m in masks.items() if not bool(m.any()))
        for n in whole:  # tensors that left training need no gradient statistics
            if n in self._hooks:
                self._hooks.pop(n).remove()
                del self._buffers[n]
        if whole:
            self.needs_rewrap = True
        if not self.trainable_groups():
            self._warn_nothing_left()
        event = {"step": self.step_count, "groups": list(names), "tensors": whole}
        for fn in list(self.on_freeze):
            fn(event)
        return event

    # -- public --------------------------------------------------------------------------------------
    def trainable_elements(self) -> int:
        """Candidate elements in groups not frozen (``always=`` parameters not counted)."""
        return sum(self.sizes[g.name] for g in self.groups if g.name not in self.frozen)

    def trainable_share(self) -> float:
        """Trainable share of the candidate elements, in [0, 1]: 0 when every group is frozen."""
        return self.trainable_elements() / self.total

    def trainable_groups(self) -> list[str]:
        """Names of the groups still trained (annealing ones included), in group order."""
        return [g.name for g in self.groups if g.name not in self.frozen]

    def update_scales(self) -> list[tuple[str, tuple[int, int] | None, float]]:
        """``(tensor, rows or None, factor)`` for each part of an annealing group: the factor the next optimizer
        step's update of those entries is scaled by (the handle applies it after the step)."""
        k = self.o.get("anneal", 0)
        out = []
        for gname, start in self.annealing.items():  # empty unless anneal= picked a group: nothing per step
            factor = 0.5 * (1.0 + math.cos(math.pi * (self.step_count + 1 - start) / (k + 1)))
            out += [(n, rows, factor) for n, rows in self._by_name[gname].parts]
        return out

    @property
    def done(self) -> bool:
        """True when freezing has nothing left to decide, so the training loop may stop.

        That is: no group is trainable any more, or every trainable group has met the freeze rule
        (``patience`` stable measurements, the last one after ``warmup``) and stays trainable only because
        the floor holds it. A group that still drifts keeps ``done`` False. Under ``rule="relative"`` some
        group is always less stable than the rest, so ``done`` turns True only once everything froze.
        """
        if self.annealing:
            return False
        active = self._active()
        if not active:
            return True
        last = self.step_count - self.step_count % self.o["interval"]  # the last measurement's step
        if last < max(self.o["warmup"], 1):
            return False
        return all(self.stable.get(g.name, 0) >= self.o["patience"] for g in active)

    def step(self) -> dict | None:
        """Advance one training step; every ``interval`` steps measure and maybe freeze. Returns the freeze
        event of this step or None."""
        self.step_count += 1
        if self._order is None and self._order_hooks:
            self._finish_order()  # the first training forward has run: the order is known
        if self._counted_tensors:
            self._counted += 1
            self._counted_tensors = set()
        event = None
        due = [g for g, start in self.annealing.items() if self.step_count - start >= self.o["anneal"]]
        if due:
            for g in due:
                del self.annealing[g]
            event = self._freeze(due)
        if self.step_count % self.o["interval"] == 0:
            event = self._measure() or event  # under anneal= a measurement freezes nothing itself
        self._collect = self._collecting(self.step_count + 1)
        if self._hook_time:
            self.history["signal_time"] = self.history.get("signal_time", 0.0) + self._hook_time
            self._hook_time = 0.0
        return event

    def close(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}
        for h in self._order_hooks:
            h.remove()
        self._order_hooks = []

    def state_dict(self) -> dict:
        return {"step": self.step_count, "prev": {k: v.clone() for k, v in self.prev.items()},
                "smoothed": dict(self.smoothed), "prev_smoothed": dict(self.prev_smoothed),
                "stable": dict(self.stable), "frozen": dict(self.frozen), "annealing": dict(self.annealing),
                "history": _copy_history(self.history), "counted": self._counted,
                "order": list(self._order) if self._order is not None else None,
                "buffers": {k: v.clone() for k, v in self._buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.prev = {k: v.clone() for k, v in state["prev"].items()}
        self.smoothed = dict(state["smoothed"])
        self.prev_smoothed = dict(state.get("prev_smoothed", {}))
        self.stable = dict(state["stable"])
        self.frozen.clear()
        self.frozen.update(state["frozen"])
        self.annealing.clear()
        self.annealing.update(state.get("annealing", {}))
        history = _copy_history(state["history"])
        history["frozen"] = self.frozen
        self.history.clear()
        self.history.update(history)
        self.selection.budget = self.trainable_elements()
        if state.get("order") is not None:
            for h in self._order_hooks:
                h.remove()
            self._order_hooks = []
            self._order = list(state["order"])
        self._counted = int(state.get("counted", 0))
        self._collect = self._collecting(self.step_count + 1)
        if self.o["source"] == "train":
            for h in self._hooks.values():
                h.remove()
            self._hooks = {}
            self._buffers = {}
            self._attach_train_hooks()
            for n, b in state["buffers"].items():
                if n in self._buffers:
                    if tuple(b.shape) != tuple(self._buffers[n].shape):
                        raise GradselError(f"jsdrift checkpoint: the saved gradient buffer of {n!r} has shape "
                                           f"{tuple(b.shape)}, this controller's {tuple(self._buffers[n].shape)}: "
                                           "the checkpoint was written with other sample= or groups= options; "
                                           "resume with the options it was written with")
                    self._buffers[n].copy_(b)


def _copy_history(h: dict) -> dict:
    return {"steps": list(h["steps"]), "drift": {k: [list(x) for x in v] for k, v in h["drift"].items()},
            "smoothed": {k: [list(x) for x in v] for k, v in h["smoothed"].items()},
            "share": [list(x) for x in h["share"]], "frozen": dict(h["frozen"]),
            "anneal_from": dict(h.get("anneal_from", {})),
            "signal_time": float(h.get("signal_time", 0.0)), "probe_time": float(h.get("probe_time", 0.0))}


def _history(obj) -> dict:
    """History from a handle, a Selection or the dict itself."""
    if isinstance(obj, dict):
        return obj
    controller = getattr(obj, "controller", None)
    if controller is not None:
        return controller.history
    info = getattr(obj, "info", {})
    if "jsdrift" not in info:
        raise GradselError("no jsdrift history here: pass the handle, the Selection or the history dict")
    return info["jsdrift"]


def drift_table(obj, *, markdown: bool = False) -> str:
    """Per group: last smoothed drift, number of measurements, freeze step (or 'active'), and under ``anneal=``
    the step its annealing began."""
    h = _history(obj)
    names = list(dict.fromkeys(list(h["smoothed"]) + list(h["frozen"])))
    annealed = h.get("anneal_from") or {}
    cols = ["group", "measurements", "last drift", "frozen at step"] + (["annealed from step"] if annealed else [])
    rows = []
    for n in names:
        series = h["smoothed"].get(n, [])
        rows.append({"group": n, "measurements": len(series),
                     "last drift": series[-1][1] if series else float("nan"),
                     "frozen at step": h["frozen"].get(n, "active"), "annealed from step": annealed.get(n, "")})
    return table(rows, cols, markdown=markdown)


def plot_drift(obj, path: str, *, title: str = "jsdrift: Fisher drift per group") -> str:
    """Drift curves (smoothed JS distance) with freeze events (and anneal spans), and the trainable share, as a
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = _history(obj)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    cmap = plt.get_cmap("tab20")
    for i, (name, series) in enumerate(h["smoothed"].items()):
        if not series:
            continue
        xs, ys = zip(*series)
        color = cmap(i % 20)
        ax.plot(xs, ys, color=color, lw=1.2, label=name if len(h["smoothed"]) <= 20 else None)
        start = h.get("anneal_from", {}).get(name)
        if start is not None:  # anneal=: the span over which its updates shrank
            ax.axvspan(start, h["frozen"].get(name, xs[-1]), color=color, alpha=0.12, lw=0)
        if name in h["frozen"]:
            ax.axvline(h["frozen"][name], color=color, ls=":", lw=0.8)
            ax.plot([h["frozen"][name]], [ys[-1]], "x", color=color)
    ax.set_ylabel("smoothed JS distance")
    ax.set_title(title)
    if h["smoothed"] and len(h["smoothed"]) <= 20:
        ax.legend(fontsize=6, ncol=2)
    if h["share"]:
        xs, ys = zip(*h["share"])
        ax2.step(xs, ys, where="post", color="k")
    ax2.set_ylabel("trainable share")
    ax2.set_xlabel("training step")
    ax2.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
