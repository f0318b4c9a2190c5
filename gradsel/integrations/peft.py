"""A Fisher selection as a peft SHiRA adapter (sparse high-rank adapter): train, save, load and merge with peft.

peft's SHiRA (``peft.ShiraConfig``, peft >= 0.17) trains a sparse set of entries of each targeted
``nn.Linear`` weight. Its ``mask_fn(base_layer, r, **kwargs)`` must return, for a weight of shape
``(out, in)``, a 0/1 mask with exactly ``r * (in + out)`` ones, the same ``r`` for every layer. A global
Fisher top-k spreads its budget unevenly, so:

- :func:`shira_select` makes a Fisher selection with exactly ``r * (in + out)`` elements in each Linear
  weight (top-k of the Fisher within each layer);
- :func:`shira_config` turns a selection (that one, or any whose per-layer counts fit one ``r``) into a
  ready ``ShiraConfig``: target modules, ``r``, the mask function, and ``modules_to_save`` for ``always=``
  modules such as a new classifier head;
- :func:`shira_mask_fn` is the mask function alone;
- :func:`save_shira` saves the adapter as peft's ``save_pretrained`` does, also when the peft model is sharded
  by FSDP2 (``fully_shard``): one complete adapter gathered to rank 0.

A :class:`gradsel.fsdp.ShardedSelection` is gathered (on every rank) for the peft model built before
``fully_shard``.

peft is imported only when these functions are called.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..errors import GradselError
from ..params import ParamSpec, resolve

__all__ = ["shira_select", "shira_config", "shira_mask_fn", "save_shira", "require_shira"]


def require_shira():
    """The ``peft`` module, after checking that it has SHiRA; a GradselError saying what to install if not."""
    try:
        import peft
    except ImportError as exc:
        raise GradselError("peft is not installed; SHiRA export needs it: pip install 'peft>=0.17'") from exc
    if not hasattr(peft, "ShiraConfig"):
        raise GradselError(f"the installed peft {getattr(peft, '__version__', '?')} has no SHiRA adapter "
                           "(peft.ShiraConfig, added in peft 0.17): upgrade with pip install -U 'peft>=0.17'")
    return peft


def _full_selection(selection, model: nn.Module):
    """The selection with full weight masks (a ShardedSelection is gathered: a collective, every rank calls it);
    a GradselError when ``model`` is already sharded by FSDP2 (peft's SHiRA layers must be added first)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = None
    if FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules()):
        raise GradselError("the model is already sharded by fully_shard (FSDP2): peft's SHiRA layers must be added "
                           "first; pass the model before fully_shard (a ShardedSelection is gathered for it), call "
                           "get_peft_model, then fully_shard the peft model and save it with save_shira")
    return selection.gather() if getattr(selection, "sharded", False) else selection


def _linear_weights(model: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """weight name → (module name, module) for every nn.Linear."""
    return {(f"{m}." if m else "") + "weight": (m, mod) for m, mod in model.named_modules()
            if isinstance(mod, nn.Linear)}


def _shira_count(layer: nn.Linear, r: int) -> int:
    return r * (layer.in_features + layer.out_features)


def shira_select(model: nn.Module, data: Any = None, r: int = 8, *, params: ParamSpec | None = None,
                 exclude: ParamSpec | None = None, always: ParamSpec | None = None, fisher=None,
                 largest: bool = True, **fisher_options: Any):
    """A Fisher selection shaped for SHiRA: exactly ``r * (in + out)`` top-Fisher entries per Linear weight.

    Args:
        model: the model (not yet wrapped by peft).
        data: batches for the Fisher estimate (see :func:`gradsel.fisher`).
        r: SHiRA's ``r``; each layer keeps as many entries as a rank-``r`` LoRA would train.
        params: parameters to consider (names, globs, module classes, callable); the ``nn.Linear`` weights
            among them are adapted. Default: every ``nn.Linear`` weight not in ``always``.
        exclude: weights to leave out.
        always: parameters trained in full (a new head); :func:`shira_config` puts their modules into
            ``modules_to_save``.
        fisher: scores computed before (reused).
        largest: False keeps the smallest Fisher entries (the ``reverse`` control).
        **fisher_options: passed to :func:`gradsel.fisher` (``num_samples``, ``progress``, ...).

    Returns:
        A :class:`gradsel.Selection` (policy ``"fish"``, ``info["budget"] == "per_layer_shira"``).
    """
    from ..fisher import fisher as estimate
    from ..policies import top_k
    from ..selection import Selection

    linears = _linear_weights(model)
    always_names = resolve(model, always, what="always") if always is not None else []
    chosen = resolve(model, params if params is not None else nn.Linear, exclude)
    names = [n for n in chosen if n in linears and n not in always_names]
    if not names:
        raise GradselError("no nn.Linear weight is left to adapt with SHiRA: check params=/exclude=/always=")
    counts = {}
    for n in names:
        layer = linears[n][1]
        counts[n] = _shira_count(layer, r)
        if counts[n] > layer.weight.numel():
            raise GradselError(f"r={r} asks for {counts[n]} entries of {n!r}, which has {layer.weight.numel()}; "
                               "use a smaller r or exclude the layer")
    if fisher is None:
        fisher = estimate(model, data, params=names, **fisher_options)
    masks = {}
    for n in names:
        masks.update(top_k({n: fisher[n]}, counts[n], largest=largest))
    params_all = dict(model.named_parameters())
    for n in always_names:
        masks[n] = torch.ones(params_all[n].shape, dtype=torch.bool)
    return Selection(masks, policy="fish" if largest else "reverse", options={}, candidates=names,
                     always=always_names, budget=sum(counts.values()),
                     info={"budget": "per_layer_shira", "shira_r": r})


def shira_mask_fn(selection, model: nn.Module) -> Callable[..., torch.Tensor]:
    """SHiRA's ``mask_fn(base_layer, r, **kwargs)`` returning the selection's mask of that layer's weight.

    Layers are recognised by their weight object, so build the peft model from this same ``model``
    (``get_peft_model(model, config)``). A layer that is not in the selection, or whose selected count is
    not ``r * (in + out)``, raises a GradselError.
    """
    require_shira()
    selection = _full_selection(selection, model)
    selection.check(model)
    linears = _linear_weights(model)
    by_weight = {id(mod.weight): (name, mod.weight) for name, (_, mod) in linears.items() if name in selection.masks}

    def mask_fn(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        weight = getattr(base_layer, "weight", None)
        found = by_weight.get(id(weight))
        if found is None or not isinstance(base_layer, nn.Linear):
            raise GradselError(f"SHiRA targets a {type(base_layer).__name__} whose weight is not in the selection "
                               f"(shape {tuple(getattr(weight, 'shape', ()))}); use shira_config(selection, model) "
                               "for the target modules, and get_peft_model on the model the selection was made for")
        name = found[0]
        mask = selection.masks[name]
        need = _shira_count(base_layer, r)
        if int(mask.sum()) != need:
            raise GradselError(f"{name!r} has {int(mask.sum())} selected entries but SHiRA with r={r} trains exactly "
                               f"r*(in+out) = {need} per layer; make the selection with "
                               "gradsel.integrations.peft.shira_select(model, data, r=...)")
        return mask.to(device=weight.device, dtype=weight.dtype)

    return mask_fn


def shira_config(selection, model: nn.Module, *, r: int | None = None, **config_kwargs: Any):
    """A ``peft.ShiraConfig`` that trains exactly the selection's Linear-weight entries.

    ``target_modules`` are the Linear layers with selected entries; ``r`` is inferred (every layer must hold
    ``r * (in + out)`` selected entries, as :func:`shira_select` makes them); modules whose parameters are
    all in ``always=`` go to ``modules_to_save``. Other keyword arguments go to ``ShiraConfig``.

    Raises:
        GradselError: peft lacks SHiRA; the selection has selected elements SHiRA cannot train (biases,
            norms, non-Linear weights, part of an ``always`` module); per-layer counts fit no single ``r``.
    """
    peft = require_shira()
    selection = _full_selection(selection, model)
    selection.check(model)
    linears = _linear_weights(model)
    modules = dict(model.named_modules())
    targets, rs, unsupported = [], {}, []
    always = set(selection.always)
    for name in selection.candidates:
        mask = selection.masks[name]
        count = int(mask.sum())
        if count == 0:
            continue
        if name not in linears:
            unsupported.append(name)
            continue
        layer = linears[name][1]
        targets.append(linears[name][0])
        rs[name] = count / (layer.in_features + layer.out_features)
    save = []
    for name in selection.always:
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        own = {(f"{module_name}." if module_name else "") + n for n, _ in modules[module_name].named_parameters()}
        if not own <= always or module_name == "":
            unsupported.append(name)
        elif module_name not in save:
            save.append(module_name)
    if unsupported:
        raise GradselError(f"SHiRA trains entries of nn.Linear weights (and whole modules_to_save); the selection "
                           f"also selects {unsupported[:4]}: make it with shira_select(), or with "
                           "params=nn.Linear and exclude= the biases")
    if not targets:
        raise GradselError("the selection selects no nn.Linear weight entry: nothing for SHiRA to train")
    values = set(rs.values())
    inferred = next(iter(values))
    if len(values) != 1 or inferred != int(inferred) or inferred < 1:
        examples = ", ".join(f"{n}: {int(selection.masks[n].sum())} = {v:.3g}*(in+out)" for n, v in
                             list(rs.items())[:3])
        raise GradselError(f"SHiRA trains r*(in+out) entries in every layer with one r, but this selection's "
                           f"counts are {examples}, ...; make it with gradsel.integrations.peft.shira_select("
                           "model, data, r=...)")
    if r is not None and r != int(inferred):
        raise GradselError(f"r={r} was given but the selection holds r={int(inferred)} per layer")
    kwargs = dict(config_kwargs)
    if save:
        kwargs["modules_to_save"] = sorted(set(kwargs.get("modules_to_save") or []) | set(save))
    with warnings.catch_warnings():  # peft warns that a custom mask_type needs a mask_fn: it gets one below
        warnings.simplefilter("ignore")
        config = peft.ShiraConfig(r=int(inferred), mask_type="gradsel", target_modules=targets, **kwargs)
    config.mask_fn = shira_mask_fn(selection, model)
    return config


def _adapter_key(key: str) -> bool:
    """peft's rule for what a SHiRA adapter file holds: the ``shira_`` tensors and the ``modules_to_save``."""
    return "shira_" in key or ".modules_to_save." in key


def save_shira(peft_model: nn.Module, path: Any, **kwargs: Any) -> Any:
    """``peft_model.save_pretrained(path)`` for a SHiRA peft model, sharded by FSDP2 or not.

    Under FSDP2 each adapter tensor (``shira_weight``, ``modules_to_save``) is gathered in full
    (``full_tensor``, every rank in the same order, one at a time) and rank 0 alone calls peft's
    ``save_pretrained`` with that state dict: one complete adapter, loadable by
    ``PeftModel.from_pretrained`` onto the unsharded base, never rank 0's slice alone. The base weights are
    not gathered. Under a process group without FSDP2 (DDP replicas) rank 0 saves. Every rank must call it;
    every rank returns once the files are written.

    Args:
        peft_model: the peft model (``get_peft_model``), possibly ``fully_shard``-ed afterwards.
        path: the adapter folder.
        **kwargs: passed to ``save_pretrained``.

    Returns:
        ``path``.

    Raises:
        GradselError: on every rank together when rank 0 could not write the adapter.
    """
    require_shira()
    from .. import distributed as gd

    group = gd.default_group()
    rank = 0 if group is None else torch.distributed.get_rank(group)
    state = None
    if gd.is_fsdp(peft_model):
        state = {}
        for key, value in peft_model.state_dict().items():  # the same order on every rank
            if not _adapter_key(key):
                continue
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if rank == 0:
                state[key] = full.detach().cpu()
            del full
    error = None
    if rank == 0:
        try:
            if state is None:
                peft_model.save_pretrained(path, **kwargs)
            else:
                peft_model.save_pretrained(path, state_dict=state, **kwargs)
        except Exception as exc:
            error = exc
    if group is not None:
        said = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(said, group=group, group_src=0)
        if error is None and said[0] is not None:
            raise GradselError(f"rank 0 could not save the SHiRA adapter to {path}: {said[0]}")
    if error is not None:
        raise error
    return path
