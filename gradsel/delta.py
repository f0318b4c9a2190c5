"""What fine-tuning changed, restricted to a selection, as a small file: :class:`SparseDelta`.

A delta holds, for every tensor that training changed, the flat indices of the changed elements and their
fine-tuned values (and, by default, their base values). Merging writes the fine-tuned values at those
indices, so the merged model is bit for bit the fine-tuned one: storing ``new - base`` and adding it back
is not exact in floating point (``base + (new - base)`` can differ from ``new`` in the last bit). Storing
the base values too makes ``unmerge`` exact without the base checkpoint, and lets ``merge`` prove that it
is writing onto the right base: the model's values at the indices must equal them bit for bit. With
``base_values=False`` the file is a third smaller; a sha256 of the base values at the indices still
checks the base, and ``unmerge`` then needs the base state dict.

Parameters outside the selection that changed make ``from_models`` fail (the delta could not reproduce
the model); changed buffers (BatchNorm running statistics) are stored whole. Files are safetensors,
written atomically, carrying a fingerprint of the base (sha256 over its sorted names, shapes and dtypes),
its list of names and shapes, and a sha256 of their own tensor bytes, so that a wrong base, a truncated
file or a flipped byte fails with a :class:`~gradsel.GradselError` instead of giving a wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ._io import atomic_save
from .errors import GradselError

__all__ = ["SparseDelta", "fingerprint"]

FORMAT_VERSION = 1
_META_KEY = "gradsel_delta"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _manifest(state_dict: Mapping[str, torch.Tensor]) -> list[list]:
    return [[n, list(t.shape), str(t.dtype).replace("torch.", "")] for n, t in sorted(state_dict.items())]


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted (name, shape, dtype) of a state dict: which model, not which values.

    >>> import torch.nn as nn
    >>> fingerprint(nn.Linear(2, 3).state_dict()) == fingerprint(nn.Linear(2, 3).state_dict())
    True
    >>> fingerprint(nn.Linear(2, 3).state_dict()) == fingerprint(nn.Linear(3, 2).state_dict())
    False
    """
    return hashlib.sha256(json.dumps(_manifest(state_dict)).encode()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of the same width (bitwise comparison: -0.0 != 0.0, NaN == same NaN)."""
    if t.is_floating_point() or t.is_complex():
        return t.contiguous().view(_INT_VIEW[t.element_size()])
    return t


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


@dataclass
class _Entry:
    name: str
    shape: tuple
    index: torch.Tensor | None  # flat indices (int32/int64); None = the whole tensor
    values: torch.Tensor
    base: torch.Tensor | None

    def current(self, t: torch.Tensor) -> torch.Tensor:
        flat = _flat(t)
        return flat.clone() if self.index is None else flat.index_select(0, self.index.to(t.device))

    def write(self, t: torch.Tensor, values: torch.Tensor) -> None:
        with torch.no_grad():
            if self.index is None:
                t.copy_(values.reshape(t.shape))
            elif t.is_contiguous():
                t.view(-1).scatter_(0, self.index.to(t.device).long(), values.to(t.device))
            else:
                flat = t.contiguous().view(-1)
                flat.scatter_(0, self.index.to(t.device).long(), values.to(t.device))
                t.copy_(flat.view(t.shape))


def _entry(name: str, new: torch.Tensor, base: torch.Tensor, mask: torch.Tensor | None, is_param: bool,
           outside: list) -> _Entry | None:
    """One tensor's entry (None when nothing in it changed); appends (name, count) of changes outside the mask
    of a parameter to ``outside``."""
    new, base = new.detach().cpu(), base.detach().cpu()
    changed = (_bits(new) != _bits(base)).reshape(-1)
    if not bool(changed.any()):
        return None
    if is_param:
        stray = changed if mask is None else changed & ~mask.reshape(-1)
        if bool(stray.any()):
            outside.append((name, int(stray.sum())))
            if mask is None:
                return None
            changed = changed & mask.reshape(-1)
            if not bool(changed.any()):
                return None
    count, numel = int(changed.sum()), new.numel()
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    sparse_bytes = count * (torch.empty(0, dtype=index_dtype).element_size() + new.element_size())
    if sparse_bytes < numel * new.element_size():
        index = changed.nonzero().squeeze(1).to(index_dtype)
        values, base_vals = _flat(new)[index.long()], _flat(base)[index.long()]
    else:
        index, values, base_vals = None, _flat(new).clone(), _flat(base).clone()
    return _Entry(name, tuple(new.shape), index, values, base_vals)


def _check_base(new_sd: Mapping[str, torch.Tensor], base_state_dict: Mapping[str, torch.Tensor],
                hint: str = "") -> None:
    """The base state dict must have the trained model's keys, shapes and dtypes."""
    if sorted(new_sd) != sorted(base_state_dict):
        extra = sorted(set(new_sd) ^ set(base_state_dict))[:5]
        raise GradselError(f"the model and base_state_dict have different entries ({extra}): pass the state "
                           "dict of the same model taken before training")
    for name, t in new_sd.items():
        b = base_state_dict[name]
        if tuple(b.shape) != tuple(t.shape) or b.dtype != t.dtype:
            raise GradselError(f"{name!r} is {tuple(t.shape)} {t.dtype} in the model but {tuple(b.shape)} "
                               f"{b.dtype} in base_state_dict: they are not the same model{hint}")


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Each parameter name (tied ones included) → the first name of that parameter (the one masks use)."""
    canonical, first = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canonical[n] = first.setdefault(id(p), n)
    return canonical


class SparseDelta:
    """The elements training changed, with their fine-tuned (and base) values; see the module docstring.

    Attributes:
        entries: one per changed tensor: name, flat indices (None when stored whole), values, base values.
        fingerprint: of the base model's names, shapes and dtypes.
        manifest: the base state dict's ``[name, shape, dtype]`` list.
        base_sha256: sha256 of the base values at the stored indices.
        selection: the selection's metadata (policy, options, budget, counts).

    >>> import copy, torch, torch.nn as nn, gradsel
    >>> model = nn.Linear(4, 2); base = copy.deepcopy(model.state_dict())
    >>> sel = gradsel.select(model, None, "random", keep=3, progress=False)
    >>> from gradsel.optim import sparse_adamw
    >>> opt = sparse_adamw(sel, model, lr=0.1)
    >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> delta = SparseDelta.from_models(sel, model, base)
    >>> fresh = nn.Linear(4, 2); fresh.load_state_dict(base)
    <All keys matched successfully>
    >>> x = torch.randn(5, 4)
    >>> bool(torch.equal(delta.merge(fresh)(x), model(x)))
    True
    >>> bool(torch.equal(delta.unmerge(fresh).weight, base["weight"]))
    True
    """

    def __init__(self, entries: list[_Entry], *, fingerprint: str, manifest: list, base_sha256: str,
                 selection: dict | None = None):
        self.entries = entries
        self.fingerprint = fingerprint
        self.manifest = manifest
        self.base_sha256 = base_sha256
        self.selection = dict(selection or {})

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, selection, model: nn.Module, base_state_dict: Mapping[str, torch.Tensor], *,
                    base_values: bool = True, strict: bool = True) -> "SparseDelta":
        """What ``model`` changed against ``base_state_dict``, within ``selection``.

        Args:
            selection: the :class:`gradsel.Selection` the model was trained with.
            model: the fine-tuned model.
            base_state_dict: the state dict of the model before training (a copy: ``copy.deepcopy(
                model.state_dict())`` taken before the first step).
            base_values: also store the base values at the changed indices (exact ``unmerge`` without the
                base; the base is checked bit for bit at merge time). False: a third smaller.
            strict: a parameter element outside the selection that changed raises (the delta could not
                reproduce the model). False: such changes are left out, with a warning.

        A :class:`gradsel.fsdp.ShardedSelection` (an FSDP2 model) goes to its ``delta``: every rank must call
        it; rank 0 gets the delta, the other ranks None.
        """
        if getattr(selection, "sharded", False):
            return selection.delta(model, base_state_dict, base_values=base_values, strict=strict)
        selection.check(model)
        new_sd = model.state_dict()
        _check_base(new_sd, base_state_dict)
        canonical = _canonical_names(model)
        entries, outside = [], []
        for name in sorted(new_sd):
            mask = selection.masks.get(canonical[name]) if name in canonical else None
            entry = _entry(name, new_sd[name], base_state_dict[name], mask, name in canonical, outside)
            if entry is not None:
                entries.append(entry)
        return cls._assemble(entries, outside, selection.metadata(), base_state_dict, base_values=base_values,
                             strict=strict)

    @classmethod
    def _assemble(cls, entries: list[_Entry], outside: list, meta: dict, base_state_dict: Mapping, *,
                  base_values: bool, strict: bool) -> "SparseDelta":
        """The delta from its entries; ``outside``: (name, count) of changes outside the selection."""
        if outside:
            what = ", ".join(f"{n} ({c} elements)" for n, c in outside[:5])
            msg = (f"training changed parameter elements outside the selection: {what}; a delta restricted to "
                   "the selection would not reproduce the model")
            if strict:
                raise GradselError(msg + ". Train with the selection applied (gradsel.optim.sparse_adamw or "
                                   "selection.apply(model, optimizer)), or pass strict=False to leave them out")
            warnings.warn(msg + "; they are left out (strict=False)", stacklevel=3)
        base_sha = cls._hash_values(e.base for e in entries)
        if not base_values:
            for e in entries:
                e.base = None
        sel_meta = {k: meta[k] for k in ("policy", "options", "budget", "selected", "total", "seed")}
        sel_meta["always"] = len(meta["always"])
        return cls(entries, fingerprint=fingerprint(base_state_dict), manifest=_manifest(base_state_dict),
                   base_sha256=base_sha, selection=sel_meta)

    @staticmethod
    def _hash_values(values) -> str:
        h = hashlib.sha256()
        for v in values:
            h.update(_bytes(v))
        return h.hexdigest()

    # -- counts ------------------------------------------------------------------------------------------
    @property
    def has_base_values(self) -> bool:
        return all(e.base is not None for e in self.entries)

    def numel(self) -> int:
        """Number of stored (changed) elements."""
        return sum(e.values.numel() for e in self.entries)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (indices, values, base values); the file adds a small header."""
        return sum(t.numel() * t.element_size() for e in self.entries
                   for t in (e.index, e.values, e.base) if t is not None)

    def __repr__(self) -> str:
        return (f"SparseDelta(tensors={len(self.entries)}, elements={self.numel():,}, bytes={self.nbytes():,}, "
                f"base_values={self.has_base_values})")

    # -- persistence -------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, e in enumerate(self.entries):
            if e.index is not None:
                out[f"{i}.index"] = e.index.contiguous()
            out[f"{i}.values"] = e.values.contiguous()
            if e.base is not None:
                out[f"{i}.base"] = e.base.contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file, atomically (temp file in the same folder, then rename)."""
        tensors = self._tensors()
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "manifest": self.manifest,
                "base_sha256": self.base_sha256, "selection": self.selection,
                "entries": [{"name": e.name, "shape": list(e.shape), "count": e.values.numel(),
                             "sparse": e.index is not None} for e in self.entries],
                "content_sha256": self._hash_values(tensors[k] for k in sorted(tensors))}
        return atomic_save(tensors, path, {_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseDelta":
        """Read a delta written by :meth:`save`, verifying its structure and its content hash."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise GradselError(f"no delta file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors' own header and length checks
            raise GradselError(f"cannot read {path}: {exc}; the file is truncated or corrupted") from exc
        if raw is None:
            raise GradselError(f"{path} is not a gradsel delta file (no {_META_KEY!r} metadata)")
        try:
            meta = json.loads(raw)
            version, specs = meta["format"], meta["entries"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise GradselError(f"{path} has unreadable delta metadata; the file is corrupted") from exc
        if version != FORMAT_VERSION:
            raise GradselError(f"{path} is delta format {version}; this gradsel reads format {FORMAT_VERSION}")
        if cls._hash_values(tensors[k] for k in sorted(tensors)) != meta["content_sha256"]:
            raise GradselError(f"{path} is corrupted: its tensors do not match the content hash it was saved with")
        entries, expected = [], set()
        for i, spec in enumerate(specs):
            keys = [f"{i}.values"] + ([f"{i}.index"] if spec["sparse"] else [])
            has_base = f"{i}.base" in tensors
            expected.update(keys + ([f"{i}.base"] if has_base else []))
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise GradselError(f"{path} is inconsistent: entry {spec['name']!r} lacks {missing}")
            values = tensors[f"{i}.values"]
            index = tensors[f"{i}.index"] if spec["sparse"] else None
            count = spec["count"] if spec["sparse"] else int(torch.Size(spec["shape"]).numel())
            if values.numel() != count or (index is not None and index.numel() != count) or (
                    has_base and tensors[f"{i}.base"].numel() != count):
                raise GradselError(f"{path} is inconsistent: entry {spec['name']!r} should hold {count} elements")
            entries.append(_Entry(spec["name"], tuple(spec["shape"]), index, values,
                                  tensors[f"{i}.base"] if has_base else None))
        if set(tensors) != expected:
            raise GradselError(f"{path} is inconsistent: unexpected tensors {sorted(set(tensors) - expected)[:5]}")
        return cls(entries, fingerprint=meta["fingerprint"], manifest=meta["manifest"],
                   base_sha256=meta["base_sha256"], selection=meta.get("selection"))

    # -- merge / unmerge ---------------------------------------------------------------------------------
    def _targets(self, model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The model's tensors by state-dict name, after checking the model is the delta's base."""
        sd = model.state_dict() if isinstance(model, nn.Module) else model
        if fingerprint(sd) != self.fingerprint:
            mine = {m[0]: m[1:] for m in _manifest(sd)}
            theirs = {m[0]: m[1:] for m in self.manifest}
            missing = [n for n in theirs if n not in mine]
            extra = [n for n in mine if n not in theirs]
            differ = [n for n in theirs if n in mine and mine[n] != theirs[n]]
            if differ:
                n = differ[0]
                why = (f"{n!r} is {tuple(mine[n][0])} {mine[n][1]} in the model but {tuple(theirs[n][0])} "
                       f"{theirs[n][1]} in the delta's base")
            elif missing:
                why = f"the model lacks {missing[:3]}"
            else:
                why = f"the model has entries the base lacked: {extra[:3]}"
            raise GradselError(f"this delta was made for a different base model: {why} (fingerprints "
                               f"{self.fingerprint[:12]} vs {fingerprint(sd)[:12]}); load the base checkpoint the "
                               "delta was trained from")
        return sd

    def merge(self, model: nn.Module) -> nn.Module:
        """Write the fine-tuned values into ``model`` (the base), in place; return it.

        Nothing is written unless every check passes: the model's names, shapes and dtypes are the base's,
        and its values at the stored indices are the base values (bit for bit, or by their sha256).
        """
        self.merge_state_dict(model.state_dict())
        return model

    def merge_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """:meth:`merge` on a state dict (e.g. a checkpoint read with ``safetensors.torch.load_file``), in place."""
        sd = self._targets(state_dict)
        current = [e.current(sd[e.name]) for e in self.entries]
        if self.has_base_values:
            ok = all(torch.equal(_bits(c), _bits(e.base.to(c.device))) for c, e in zip(current, self.entries))
        else:
            ok = self._hash_values(current) == self.base_sha256
        if not ok:
            if all(torch.equal(_bits(c), _bits(e.values.to(c.device))) for c, e in zip(current, self.entries)):
                raise GradselError("the delta is already merged into this model")
            raise GradselError("the model's values at the delta's positions are not those of the base it was made "
                               "from: same architecture, different checkpoint (or the model was changed since); "
                               "merge onto the exact base checkpoint")
        for e in self.entries:
            e.write(sd[e.name], e.values)
        return state_dict

    def unmerge(self, model: nn.Module, base_state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Restore the base values in a merged ``model``, in place; return it.

        Needs ``base_state_dict`` only when the delta was made with ``base_values=False``.
        """
        self.unmerge_state_dict(model.state_dict(), base_state_dict)
        return model

    def unmerge_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                           base_state_dict: Mapping[str, torch.Tensor] | None = None) -> Mapping[str, torch.Tensor]:
        """:meth:`unmerge` on a state dict, in place."""
        sd = self._targets(state_dict)
        for e in self.entries:
            if not torch.equal(_bits(e.current(sd[e.name])), _bits(e.values.to(sd[e.name].device))):
                raise GradselError(f"{e.name!r} does not hold the delta's values: the delta is not merged into this "
                                   "model (or the model changed since); nothing was restored")
        if self.has_base_values:
            bases = [e.base for e in self.entries]
        else:
            if base_state_dict is None:
                raise GradselError("this delta was saved without base values (base_values=False): pass the base "
                                   "state dict to unmerge(model, base_state_dict)")
            bases = [e.current(base_state_dict[e.name]) for e in self.entries]
            if self._hash_values(bases) != self.base_sha256:
                raise GradselError("base_state_dict is not the base this delta was made from (its values at the "
                                   "delta's positions differ)")
        for e, b in zip(self.entries, bases):
            e.write(sd[e.name], b)
        return state_dict
