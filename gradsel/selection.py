"""``select`` and the ``Selection`` it returns: masks, counts, persistence, application."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_save, clean_stale_temps, content_sha256
from . import distributed
from .errors import GradselError
from .fisher import Fisher
from .masking import MaskHandle
from .params import ParamSpec, resolve, strip_wrapper_prefix, unwrap_model
from .policies import Context, Policy, get_policy
from .report import table

__all__ = ["select", "Selection", "resolve_budget"]

FORMAT_VERSION = 2  # 2: files carry a sha256 of their metadata and masks
_META_KEY = "gradsel"
_HASH_KEY = "gradsel_sha256"


def resolve_budget(keep: float | int, total: int) -> int:
    """The exact element count for ``keep``: a fraction in (0, 1] of ``total``, or an integer count.

    A fraction gives ``round(keep * total)``, at least 1. Integers are counts (``keep=1`` is one
    element; ``keep=1.0`` is everything).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise GradselError(f"keep must be a fraction in (0, 1] or an integer count, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= total:
            raise GradselError(f"keep={keep} elements is outside 1..{total:,} (the number of candidate elements); "
                               "pass a smaller count or a fraction such as keep=0.005")
        return keep
    if not (0.0 < keep <= 1.0):
        raise GradselError(f"keep={keep} is outside (0, 1]: pass the fraction of candidate elements to train "
                           "(e.g. 0.005 for 0.5%) or an integer count")
    return max(1, min(total, round(keep * total)))


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        if isinstance(value, torch.Tensor):
            return value.tolist()
        return repr(value)


class Selection:
    """Boolean masks per parameter (True = trained) and what produced them.

    Attributes:
        masks: name → bool tensor of the parameter's shape, for every candidate and every ``always=``
            parameter.
        policy: the policy's registered name.
        options: the policy's options.
        candidates: names of the ranked parameters.
        always: names of parameters trained in full, outside the ranking.
        shapes: name → shape of every masked parameter.
        budget: the number of candidate elements selected (exact).
        seed: the seed given to ``select``.
        info: what the policy recorded (e.g. IRD rounds, jsdrift history).
    """

    def __init__(self, masks: dict[str, torch.Tensor], *, policy: str, options: dict | None = None,
                 candidates: list[str], always: list[str] | None = None, budget: int | None = None,
                 seed: int = 0, info: dict | None = None, policy_object: Policy | None = None):
        self.masks = {n: m.detach().to("cpu", torch.bool) for n, m in masks.items()}
        self.policy = policy
        self.options = dict(options or {})
        self.candidates = list(candidates)
        self.always = list(always or [])
        self.shapes = {n: tuple(m.shape) for n, m in self.masks.items()}
        self.budget = self.selected() if budget is None else budget
        self.seed = seed
        self.info = info if info is not None else {}
        self._policy_object = policy_object

    # -- counts ------------------------------------------------------------------------------------------
    def selected(self) -> int:
        """Number of selected candidate elements, counted from the masks."""
        return sum(int(self.masks[n].sum()) for n in self.candidates)

    def total(self) -> int:
        """Number of candidate elements."""
        return sum(self.masks[n].numel() for n in self.candidates)

    def trainable(self) -> int:
        """Selected candidate elements plus every ``always=`` element."""
        return self.selected() + sum(self.masks[n].numel() for n in self.always)

    def rows(self, by: str | int = "tensor") -> list[dict]:
        """Per-group counts: ``by="tensor"``, or an int ``d`` to group by the first ``d`` name parts."""
        groups: dict[str, dict] = {}
        for name in self.candidates + self.always:
            key = name if by == "tensor" else ".".join(name.split(".")[: int(by)])
            if name in self.always:
                key += " (always)"
            row = groups.setdefault(key, {"group": key, "selected": 0, "total": 0})
            row["selected"] += int(self.masks[name].sum())
            row["total"] += self.masks[name].numel()
        for row in groups.values():
            row["share"] = row["selected"] / row["total"] if row["total"] else 0.0
        return list(groups.values())

    def summary(self, by: str | int = "tensor", *, markdown: bool = False) -> str:
        """A table of selected / total / share per group, then the candidate and overall totals."""
        rows = self.rows(by)
        sel, tot = self.selected(), self.total()
        rows.append({"group": "candidates", "selected": sel, "total": tot, "share": sel / tot})
        if self.always:
            all_tot = tot + sum(self.masks[n].numel() for n in self.always)
            rows.append({"group": "trainable (candidates + always)", "selected": self.trainable(),
                         "total": all_tot, "share": self.trainable() / all_tot})
        head = f"Selection: policy={self.policy}, budget={self.budget:,} of {tot:,} candidate elements"
        return head + "\n\n" + table(rows, ["group", "selected", "total", "share"], markdown=markdown)

    def __repr__(self) -> str:
        return (f"Selection(policy={self.policy!r}, selected={self.selected():,}/{self.total():,}, "
                f"tensors={len(self.candidates)}, always={len(self.always)})")

    # -- application -------------------------------------------------------------------------------------
    def policy_object(self) -> Policy:
        if self._policy_object is None:
            self._policy_object = get_policy(self.policy, **self.options)
        return self._policy_object

    def apply(self, model: nn.Module, optimizer: Any = None) -> MaskHandle:
        """Train only the selection: returns a handle (context manager; ``.step()``, ``.remove()``).

        With ``optimizer`` given, masked entries stay bit-for-bit unchanged under any torch optimizer,
        weight decay and momentum included. The model's state_dict keys and module classes are not
        changed.

        >>> import torch, torch.nn as nn, gradsel
        >>> model = nn.Linear(4, 2)
        >>> sel = gradsel.select(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), keep=3, progress=False)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        >>> before = model.weight.detach().clone()
        >>> with sel.apply(model, opt) as handle:
        ...     nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
        ...     opt.step(); handle.step()
        >>> bool(torch.equal(model.weight[~sel.masks["weight"]], before[~sel.masks["weight"]]))
        True
        """
        return MaskHandle(self, distributed.for_apply(model, self), optimizer)

    def optimizer(self, model: nn.Module, lr: float = 1e-3, **kwargs: Any):
        """A :class:`gradsel.optim.SparseAdamW` that holds state only for the selected elements.

        Shorthand for ``gradsel.optim.sparse_adamw(self, model, lr, **kwargs)``; use it instead of
        :meth:`apply`, since nothing outside the selection can move under it.
        """
        from .optim import sparse_adamw

        return sparse_adamw(self, model, lr, **kwargs)

    def delta(self, model: nn.Module, base_state_dict: Any, **kwargs: Any):
        """What training changed within the selection, as a :class:`gradsel.delta.SparseDelta`.

        Shorthand for ``SparseDelta.from_models(self, model, base_state_dict, **kwargs)``.
        """
        from .delta import SparseDelta

        return SparseDelta.from_models(self, model, base_state_dict, **kwargs)

    def check(self, model: nn.Module) -> None:
        """Raise a GradselError naming the first parameter whose name or shape differs from ``model``.

        Names are those of the unwrapped model (:func:`gradsel.params.unwrap_model`), so a selection made on
        a model applies to its ``torch.compile`` / DDP wrappers and back. A selection whose names carry such
        a wrapper's prefix (saved by an older gradsel) is renamed in place, with a warning.
        """
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        self._drop_wrapper_prefixes(params)
        for name, shape in self.shapes.items():
            if name not in params:
                raise GradselError(self._missing(name, params, model))
            if tuple(params[name].shape) != tuple(shape):
                raise GradselError(f"parameter {name!r} has shape {tuple(params[name].shape)} in the model but "
                                   f"{tuple(shape)} in the selection: it was made for a different model")

    def _drop_wrapper_prefixes(self, params: dict) -> None:
        names = list(self.shapes)
        plain = {n: strip_wrapper_prefix(n) for n in names}
        if all(n in params for n in names) or not all(plain[n] in params for n in names):
            return
        first = next(n for n in names if plain[n] != n)
        warnings.warn(f"the selection's parameter names carry the wrapper prefix {first[:len(first) - len(plain[first])]!r}"
                      f" (saved from a torch.compile / DDP-wrapped model by an older gradsel); mapped them to the "
                      f"model's names ({first!r} -> {plain[first]!r}). Save the selection again to drop the prefix.",
                      UserWarning, stacklevel=3)
        self.masks = {plain[n]: m for n, m in self.masks.items()}
        self.shapes = {plain[n]: s for n, s in self.shapes.items()}
        self.candidates = [plain[n] for n in self.candidates]
        self.always = [plain[n] for n in self.always]

    def _missing(self, name: str, params: dict, model: nn.Module) -> str:
        """What to say when the selection names ``name`` and the model has no such parameter."""
        names = list(self.shapes)
        for other in params:
            if other.endswith("." + name):  # the model's names are longer: selection made on a submodule?
                extra = other[: len(other) - len(name)]
                if all(extra + n in params for n in names):
                    return (f"the model's parameter names carry a prefix {extra!r} that the selection's lack "
                            f"({name!r} is {other!r} in {type(model).__name__}): the selection was made on the "
                            f"submodule model.{extra[:-1]}. Apply it to that submodule, or select on this model")
            if name.endswith("." + other):  # the selection's names are longer: made on a model around this one?
                extra = name[: len(name) - len(other)]
                if all(n.startswith(extra) and n[len(extra):] in params for n in names):
                    return (f"the selection's parameter names carry a prefix {extra!r} that the model's lack "
                            f"({name!r} is {other!r} in {type(model).__name__}): it was made on a model that holds "
                            f"this one as .{extra[:-1]}. Apply it to that model, or select on this one")
        return (f"the selection names parameter {name!r}, which {type(model).__name__} does not have: it was made "
                f"for a different model (policy {self.policy!r}; the model's names look like "
                f"{', '.join(list(params)[:4])}, ...)")

    # -- persistence -------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT_VERSION, "policy": self.policy, "options": _jsonable(self.options),
                "candidates": self.candidates, "always": self.always,
                "shapes": {n: list(s) for n, s in self.shapes.items()}, "budget": self.budget,
                "selected": self.selected(), "total": self.total(), "seed": self.seed,
                "info": _jsonable(self.info)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write masks and metadata to a safetensors file, atomically (temp file, then rename).

        The file carries a sha256 over its metadata and mask bytes; :meth:`load` refuses a file that
        does not match it.
        """
        tensors = {n: m.contiguous() for n, m in self.masks.items()}
        raw = json.dumps(self.metadata())
        return atomic_save(tensors, path, {_META_KEY: raw, _HASH_KEY: _content_hash(raw, tensors)})

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None, *,
             allow_unhashed: bool = False) -> "Selection":
        """Read a selection saved by :meth:`save`, verifying its content hash; with ``model``, check it matches.

        Args:
            path: the file.
            model: if given, every masked parameter must exist in it with the saved shape.
            allow_unhashed: read a format-1 file (written before selection files carried a hash) without
                proof of its content; save it again to give it one.
        """
        from safetensors import safe_open

        path = Path(path)
        clean_stale_temps(path)
        if not path.is_file():
            raise GradselError(f"no selection file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                masks = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as exc:  # safetensors raises its own errors on truncated or corrupted files
            raise GradselError(f"cannot read {path}: {exc}; the file is truncated or corrupted") from exc
        raw = header.get(_META_KEY)
        if raw is None:
            raise GradselError(f"{path} is not a gradsel selection file (no {_META_KEY!r} metadata)")
        changed = (f"{path} was changed or corrupted after it was saved: its masks or metadata do not match the "
                   "sha256 it was saved with. Re-create the selection with gradsel.select and save it again, or "
                   "restore the file from a copy; to edit a selection, change the Selection in Python and call "
                   ".save(), which writes a new hash")
        try:
            meta = json.loads(raw)
            version = meta["format"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise GradselError(changed) from exc
        if version == 1 and _HASH_KEY not in header:
            if not allow_unhashed:
                raise GradselError(
                    f"{path} is selection format 1, written before selection files carried a content hash, so "
                    "gradsel cannot prove its masks are the ones saved. Re-create it with gradsel.select and save "
                    "it, or, if you trust the file, load it once with Selection.load(path, allow_unhashed=True) "
                    f"and save it again (format {FORMAT_VERSION}, hashed)")
        elif version != FORMAT_VERSION:
            if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
                raise GradselError(f"{path} is selection format {version}; this gradsel reads formats 1 to "
                                   f"{FORMAT_VERSION}: upgrade gradsel to read it")
            raise GradselError(changed)
        elif header.get(_HASH_KEY) != _content_hash(raw, masks):
            raise GradselError(changed)
        try:
            names = meta["candidates"] + meta["always"]
            if sorted(masks) != sorted(names):
                raise GradselError(f"{path} is inconsistent: masks for {sorted(set(masks) ^ set(names))[:5]} "
                                   "do not match its metadata")
            sel = cls({n: masks[n] for n in names}, policy=meta["policy"], options=meta["options"],
                      candidates=meta["candidates"], always=meta["always"], budget=meta["budget"],
                      seed=meta["seed"], info=meta.get("info", {}))
            saved_selected = meta["selected"]
        except (KeyError, TypeError) as exc:
            raise GradselError(f"{path} has incomplete selection metadata ({exc!r}); {changed}") from exc
        if sel.selected() != saved_selected:
            raise GradselError(f"{path} is corrupted: its masks select {sel.selected()} elements, "
                               f"its metadata says {saved_selected}")
        if model is not None:
            sel.check(model)
        return sel


def _content_hash(raw_metadata: str, masks: dict[str, torch.Tensor]) -> str:
    """sha256 over a selection file's metadata string and every mask's name, dtype, shape and bytes."""
    return content_sha256(raw_metadata.encode(), ((n, masks[n]) for n in sorted(masks)))


def select(model: nn.Module, data: Any = None, policy: str | Policy = "fish", *, keep: float | int | None = None,
           params: ParamSpec | None = None, exclude: ParamSpec | None = None, always: ParamSpec | None = None,
           fisher: Fisher | None = None, seed: int = 0, loss=None, forward=None, num_samples: int | None = None,
           kind: str = "empirical", chunk_size: int | None = None, progress: bool = True, group: Any = None,
           **options: Any) -> Selection:
    """Choose which parameter elements of ``model`` to train.

    Args:
        model: any ``nn.Module``.
        data: batches for the Fisher estimate (see :func:`gradsel.fisher`); not needed by ``random`` or
            when ``fisher=`` is given.
        policy: a registered name (``gradsel.list_policies()``) or a :class:`Policy` instance.
        keep: how many candidate elements to train: a fraction in (0, 1] or an integer count. Exact.
        params: candidate parameters (names, globs, module classes, callable); default all that require
            grad, or a peft model's adapter parameters.
        exclude: parameters to drop from the candidates.
        always: parameters trained in full and kept out of the ranking (e.g. ``"classifier.*"``).
        fisher: scores computed before, reused instead of estimating again.
        seed: seed for random policies and Monte-Carlo labels.
        loss, forward, num_samples, kind, chunk_size, progress: passed to :func:`gradsel.fisher`.
        group: torch.distributed process group (default: the world group when initialised): the Fisher is
            reduced over it and the ranks' masks are checked to agree (``docs/scaling-out.md``).
        **options: the policy's own options (e.g. ``budget="per_tensor"`` for ``fish``).

    Returns:
        A :class:`Selection`.

    >>> import torch, torch.nn as nn, gradsel
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    >>> sel = gradsel.select(model, batch, "fish", keep=0.25, always="2.*", progress=False)
    >>> sel.selected(), sel.total()
    (10, 40)
    """
    pol = get_policy(policy, **options)
    model = distributed.unwrap(model)  # DDP: the user's names, without "module."
    if distributed.is_fsdp(model):  # FSDP2: top-k over the sharded Fisher, masks as local shards
        from .fsdp import select as sharded_select

        return sharded_select(model, data, pol, keep=keep, params=params, exclude=exclude, always=always,
                              fisher=fisher, seed=seed,
                              fisher_options=dict(loss=loss, forward=forward, num_samples=num_samples, kind=kind,
                                                  chunk_size=chunk_size, progress=progress, seed=seed,
                                                  **({} if group is None else {"group": group})))
    always_names = resolve(model, always, what="always") if always is not None else []
    names = [n for n in resolve(model, params, exclude) if n not in set(always_names)]
    if not names:
        raise GradselError("every candidate is also in always=: nothing is left to rank")
    all_params = dict(model.named_parameters())
    shapes = {n: all_params[n].shape for n in names}
    total = sum(all_params[n].numel() for n in names)
    if keep is None:
        if pol.default_keep is None:
            raise GradselError(f"policy {pol.name!r} needs keep=: a fraction in (0, 1] or an integer count")
        keep = pol.default_keep
    k = resolve_budget(keep, total)
    if fisher is not None:
        missing = [n for n in names if n not in fisher]
        if missing:
            raise GradselError(f"fisher= has no scores for {missing[:5]}: estimate it with the same params=")
        bad = [n for n in names if tuple(fisher[n].shape) != tuple(shapes[n])]
        if bad:
            raise GradselError(f"fisher= scores for {bad[0]!r} have shape {tuple(fisher[bad[0]].shape)}, "
                               f"the parameter {tuple(shapes[bad[0]])}: they belong to another model")
    ctx = Context(model=model, data=data, candidates=names, shapes=dict(shapes), k=k, seed=seed,
                  fisher_options=dict(loss=loss, forward=forward, num_samples=num_samples, kind=kind,
                                      chunk_size=chunk_size, progress=progress, seed=seed,
                                      **({} if group is None else {"group": group})),
                  _scores=fisher)
    masks = pol.select(ctx)
    _check_masks(pol, masks, shapes, k)
    masks = {n: masks[n] for n in names}
    for n in always_names:
        masks[n] = torch.ones(all_params[n].shape, dtype=torch.bool)
    distributed.check_masks_agree(masks, group)  # no-op in a single process
    return Selection(masks, policy=pol.name, options=pol.options, candidates=names, always=always_names,
                     budget=k, seed=seed, info=ctx.info, policy_object=pol)


def _check_masks(pol: Policy, masks: dict, shapes: dict, k: int) -> None:
    """A policy's output must be bool masks of the right shapes with exactly k selected."""
    missing = [n for n in shapes if n not in masks]
    if missing:
        raise GradselError(f"policy {pol.name!r} returned no mask for {missing[:5]}")
    for n, shape in shapes.items():
        m = masks[n]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != tuple(shape):
            raise GradselError(f"policy {pol.name!r} returned a bad mask for {n!r}: need a bool tensor of shape "
                               f"{tuple(shape)}, got {getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
    count = sum(int(masks[n].sum()) for n in shapes)
    if count != k and not pol.progressive:
        raise GradselError(f"policy {pol.name!r} selected {count} elements, the budget is {k}: a policy must "
                           "select exactly ctx.k (use gradsel.policies.top_k)")
