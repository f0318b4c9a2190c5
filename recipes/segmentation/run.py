"""The segmentation recipe: Fisher-guided fine-tuning of a pretrained Unet, with zero-shot transfer.

An smp Unet whose MobileNetV2 (or EfficientNet-Lite0) encoder carries ImageNet weights loaded offline
segments thin cracks rendered over real photographs (source domain), and is evaluated in-domain and
zero-shot on a shifted target domain (other photographs, thinner, fainter, noisier cracks). Or, with
``dataset.name: nuclei``, on tiles of the real fluorescence image shipped in ``stardist``.
Run ``python -m recipes.segmentation --config demo`` (configs: smoke, demo, full).

Methods (``methods`` in the config):

- ``full``: every parameter trained;
- ``decoder_only``: the encoder frozen, the decoder and head trained (the common fixed pattern);
- ``fish`` / ``fish_large``: FISH over the encoder at ``fish.keep`` / ``fish.keep_large`` of its elements,
  decoder and head trained in full;
- ``fish_nowarm``: ``fish`` with the Fisher taken at initialisation (random decoder), no warm-up;
- ``fish_row``: FISH over the encoder at ``fish.keep`` by whole output channels (``granularity="row"``),
  trained through :func:`gradsel.rowsparse.row_sparse` (backward forms the weight gradient of the selected
  channels only; grouped convolutions keep the dense one) with :class:`gradsel.optim.SparseAdamW`
  (optimizer state for the selected elements only);
- ``random`` / ``reverse``: the controls at ``fish.keep``;
- ``ird``: IRD over the encoder at ``fish.keep``;
- ``jsdrift``: progressive freezing of encoder stages and decoder blocks (head never frozen), with the
  options of the config's ``jsdrift:`` (e.g. ``preset: fast``: the training gradients as the signal,
  freezing from the input side; without a preset, jsdrift's defaults, as the published table ran);
- ``jsdrift_encoder``: the same over the encoder's stages only, with ``floor=0``: the pretrained encoder
  freezes stage by stage while the decoder and head, which start from random weights, train throughout
  (``always=``). Freezing a randomly initialised decoder halfway stops it learning; the systems that
  report savings from freezing (FreezeOut, AutoFreeze, Egeria) freeze pretrained layers from the input side.
- ``jsdrift_<name>``: a variant: the config's ``jsdrift:`` updated by ``jsdrift_variants.<name>`` (policy
  options, and ``base: jsdrift_encoder`` to build on that method instead of ``jsdrift``).

``dataset.n_validation: N`` renders N more images of the training distribution (the samples after the
training images; the training images stay the same) and reports each run's IoU on them beside the
in-domain test IoU: a place to choose options that is not the test set.

``training.schedule``: ``constant`` (the default) or ``cosine`` (the lr falls to 0 at the last step).

Warm-up (``fish.warmup_steps``): the decoder and head are new, so gradients reaching the encoder at
initialisation are shaped by a random decoder. The recipe trains the decoder and head alone for that many
steps, takes the Fisher there, and puts the weights back: the warm-up informs the scores only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradsel
from gradsel.errors import GradselError
from gradsel.optim import state_bytes
from gradsel.policies.jsdrift import JSDrift, plot_drift

from .. import common
from .data import denormalize, loader, make_crack_sets, make_nuclei_tiles
from .model import build_unet, encoder_groups, input_norm

CONFIGS = Path(__file__).resolve().parent / "configs"
ALL_METHODS = ["full", "decoder_only", "fish", "fish_large", "fish_nowarm", "fish_row", "random", "reverse", "ird",
               "jsdrift", "jsdrift_encoder"]
STATIC = {"fish": "fish", "fish_large": "fish", "fish_nowarm": "fish", "fish_row": "fish", "random": "random",
          "reverse": "reverse", "ird": "ird"}
SHOW = 3  # examples per split in the overlay figure
SPLITS = {"val": "in-domain", "target": "zero-shot", "validation": "validation"}  # split -> its columns' name


def _data(cfg: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = cfg["dataset"]
    norm = input_norm(cfg["encoder"])
    if d.get("name", "cracks") == "nuclei":
        if d.get("n_validation"):
            raise GradselError("dataset.n_validation is for the rendered cracks only: the nuclei tiles have no "
                               "held-out training tiles (remove n_validation, or use name: cracks)")
        tiles = make_nuclei_tiles(size=d.get("size", 128), seed=d.get("seed", 0), norm=norm)
        return {"train": tiles["train"], "val": tiles["test"]}
    return make_crack_sets(d["n_train"], d["n_val"], d["n_target"], size=d.get("size", 128), seed=d.get("seed", 0),
                           norm=norm, n_validation=d.get("n_validation", 0))


def jsdrift_setup(cfg: dict, method: str) -> tuple[str, dict]:
    """``(base, JSDrift options)`` of a jsdrift method: ``jsdrift``, ``jsdrift_encoder`` or a ``jsdrift_<name>``
    variant (``base:`` in its options, default ``jsdrift``). ``jsdrift_encoder`` keeps no group unfrozen
    (floor 0: the decoder trains throughout) unless the variant sets its own floor."""
    js = common.jsdrift_options(cfg, method)
    base = js.pop("base", method if method in ("jsdrift", "jsdrift_encoder") else "jsdrift")
    if base not in ("jsdrift", "jsdrift_encoder"):
        raise GradselError(f"jsdrift_variants.{method}.base={base!r}: use 'jsdrift' (encoder stages and decoder "
                           "blocks freeze) or 'jsdrift_encoder' (encoder stages only)")
    if base == "jsdrift_encoder":
        js["floor"] = (cfg.get("jsdrift_variants") or {}).get(method, {}).get("floor", 0)
    return base, js


def lr_schedule(opt: torch.optim.Optimizer, kind: str, steps: int):
    """``training.schedule``: ``constant`` (None: the optimizer's lr throughout) or ``cosine`` (from the lr down
    to 0 at the last step, one scheduler step per optimizer step)."""
    if kind == "constant":
        return None
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    raise GradselError(f"training.schedule={kind!r}: use 'constant' or 'cosine'")


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 16) -> tuple[float, float, np.ndarray]:
    """Foreground IoU and Dice over the whole set (pixels pooled), and the first predictions."""
    model.eval()
    inter = union = pred_sum = true_sum = 0
    preds = []
    for xb, yb in loader(x, y, batch_size):
        p = model(xb).argmax(1)
        t = yb.bool()
        pb = p.bool()
        inter += int((pb & t).sum())
        union += int((pb | t).sum())
        pred_sum += int(pb.sum())
        true_sum += int(t.sum())
        if sum(len(q) for q in preds) < SHOW:
            preds.append(p.numpy())
    iou = inter / union if union else 1.0
    dice = 2 * inter / (pred_sum + true_sum) if pred_sum + true_sum else 1.0
    return iou, dice, np.concatenate(preds)[:SHOW]


def _warmup(model, train_loader, steps, lr, trainable):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _, b in zip(range(steps), common.cycle(train_loader)):
        opt.zero_grad()
        _loss(model, b).backward()
        opt.step()
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    model.eval()


def run_one(cfg: dict, method: str, seed: int, out: str) -> dict:
    """Train and evaluate one method with one seed; returns a row of measurements."""
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    data = _data(cfg)
    tr, fi = cfg["training"], cfg["fish"]
    model = build_unet(cfg["encoder"], pretrained=cfg.get("pretrained", True))
    names = [n for n, _ in model.named_parameters()]
    encoder = [n for n in names if n.startswith("encoder.")]
    new_parts = [n for n in names if not n.startswith("encoder.")]
    head = [n for n in names if n.startswith("segmentation_head.")]
    xtr, ytr = data["train"]
    train = loader(xtr, ytr, tr["batch_size"], shuffle=True, seed=seed)
    # a fixed list of batches: every pass over it (warm-up, Fisher, IRD rounds, jsdrift probes) sees the same
    # samples in the same order
    rng = np.random.default_rng(10_000 + seed)
    pick = rng.permutation(len(xtr))[: max(fi["num_samples"], cfg.get("jsdrift", {}).get("probe_samples", 0))]
    probe = list(loader(xtr[pick], ytr[pick], tr["batch_size"]))

    selection, fisher_time = None, 0.0
    if method == "decoder_only":
        for n in encoder:
            model.get_parameter(n).requires_grad_(False)
    elif method in STATIC:
        t0 = time.perf_counter()
        start = copy.deepcopy(model.state_dict())
        warm = 0 if method in ("fish_nowarm", "random") else fi.get("warmup_steps", 0)
        if warm:
            _warmup(model, probe, warm, tr["lr"], set(new_parts))
        keep = fi["keep_large"] if method == "fish_large" else fi["keep"]
        options = dict(fi.get("ird_options", {})) if method == "ird" else {}
        if method == "fish_row":
            options["granularity"] = "row"
        selection = gradsel.select(model, probe if method != "random" else None, STATIC[method], keep=keep,
                                   params=encoder, always=new_parts, num_samples=fi["num_samples"], seed=seed,
                                   progress=cfg.get("progress", True), **options)
        model.load_state_dict(start)  # the warm-up informed the scores only
        fisher_time = time.perf_counter() - t0
    elif method.startswith("jsdrift"):
        base, js = jsdrift_setup(cfg, method)
        groups = encoder_groups(model)
        groups.pop("head", None)
        if base == "jsdrift_encoder":  # the new decoder trains throughout; every encoder stage may freeze
            groups = {g: ns for g, ns in groups.items() if g.startswith("encoder.")}
            params, always = encoder, new_parts
        else:
            params, always = [n for n in names if n not in head], head
        policy = JSDrift(groups=groups, probe=probe, **js)
        t0 = time.perf_counter()
        selection = gradsel.select(model, None, policy, params=params, always=always, seed=seed, progress=False)
        fisher_time = time.perf_counter() - t0
    elif method != "full":
        raise GradselError(f"unknown method {method!r}: choose from {ALL_METHODS}")

    total = sum(p.numel() for p in model.parameters())
    steps = tr["steps"]
    rows = None
    if method == "fish_row":  # sparse state, and the weight gradient of the selected channels only
        from gradsel.optim import sparse_adamw
        from gradsel.rowsparse import row_sparse

        opt = sparse_adamw(selection, model, tr["lr"], weight_decay=tr.get("weight_decay", 0.01))
        handle = None  # SparseAdamW never writes outside the masks: no guard needed
        rows = row_sparse(model, selection)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tr["lr"],
                                weight_decay=tr.get("weight_decay", 0.01))
        handle = selection.apply(model, opt) if selection is not None else None
    schedule = lr_schedule(opt, tr.get("schedule", "constant"), steps)
    trainable = common.trainable_count(model, selection.masks if selection is not None else None)
    guard = common.MovementCheck(model, lambda: selection.masks if selection is not None else {})
    shares, backward, step_times, counts = [], [], [], {}
    model.train()
    with common.PeakRSS() as mem:
        t_start, cpu_start = time.perf_counter(), time.process_time()
        for _, b in zip(range(steps), common.cycle(train)):
            guard.before_step()
            t0 = time.perf_counter()
            loss = _loss(model, b)
            opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            loss.backward()
            backward.append(time.perf_counter() - t1)
            opt.step()
            if schedule is not None:
                schedule.step()
            if handle is not None:
                handle.step()
            step_times.append(time.perf_counter() - t0)
            guard.after_step()
            shares.append(common.trainable_count(model, selection.masks if selection is not None else None,
                                                 counts) / total)
        train_time, train_cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    history = handle.controller.history if handle is not None and handle.controller is not None else None
    if handle is not None:
        handle.remove()
    if rows is not None:
        rows.remove()
    row = {"method": method, "seed": seed, "trainable params": trainable, "trainable share": trainable / total,
           "final trainable share": shares[-1], "mean trainable share": float(np.mean(shares)),
           "train time (s)": train_time, "train CPU (s)": train_cpu, "step (s)": float(np.median(step_times)),
           "backward (s)": float(np.median(backward)),
           "backward first 10% (s)": float(np.median(backward[: max(1, steps // 10)])),
           "backward last 10% (s)": float(np.median(backward[-max(1, steps // 10):])),
           "peak train MiB": mem.mib, "fisher time (s)": fisher_time, "masked unchanged": guard.ok,
           "elements changed": guard.changed, "run time (s)": train_time + fisher_time,
           "optimizer state MiB": state_bytes(opt) / 2**20,
           "optimizer state elements": sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)}
    if rows is not None:
        row.update({"row-sparse layers": len(rows.layers), "rows trained": sum(t for t, _ in rows.layers.values()),
                    "rows": sum(r for _, r in rows.layers.values()), "dense layers (grouped)": len(rows.skipped)})
    if history is not None:
        row.update({"signal time (s)": float(history.get("signal_time", 0.0)),
                    "signal share": float(history.get("signal_time", 0.0)) / train_time,
                    "groups frozen": len(history["frozen"]),
                    "freeze steps": " ".join(f"{g}@{s}" for g, s in history["frozen"].items())})
    preds = {}
    for split, key in SPLITS.items():
        if split in data:
            iou, dice, p = evaluate(model, *data[split])
            row[f"{key} IoU"], row[f"{key} Dice"] = iou, dice
            if split != "validation":  # the overlay figure shows the test splits
                preds[split] = p
    out_dir = Path(out)
    if seed == cfg["seeds"][0]:
        np.savez_compressed(out_dir / f"pred_{method}.npz", **preds)
        if history is not None:
            (out_dir / f"{method}_history_seed{seed}.json").write_text(json.dumps(history))
    return row


COLUMNS = [
    ("method", "", lambda r: r["method"]),
    ("trainable share (start → mean)", "", lambda r: f"{r['trainable share']:.4f} → {r['mean trainable share']:.4f}"),
    ("in-domain IoU", "", lambda r: common.pm(r["in-domain IoU"], r["in-domain IoU std"], 3)),
    ("in-domain Dice", "", lambda r: common.pm(r["in-domain Dice"], r["in-domain Dice std"], 3)),
    ("zero-shot IoU", "", lambda r: common.pm(r.get("zero-shot IoU", float("nan")), r.get("zero-shot IoU std", float("nan")), 3)),
    ("zero-shot Dice", "", lambda r: common.pm(r.get("zero-shot Dice", float("nan")), r.get("zero-shot Dice std", float("nan")), 3)),
    ("final share", "", lambda r: round(r["final trainable share"], 4)),
    ("train time (s)", "", lambda r: round(r["train time (s)"], 1)),
    ("train CPU (s)", "", lambda r: round(r.get("train CPU (s)", float("nan")), 1)),
    ("step (s)", "", lambda r: round(r["step (s)"], 3)),
    ("backward/step (s)", "", lambda r: round(r["backward (s)"], 3)),
    ("backward last 10% (s)", "", lambda r: round(r["backward last 10% (s)"], 3)),
    ("peak MiB", "", lambda r: round(r["peak train MiB"], 1)),
    ("fisher time (s)", "", lambda r: round(r["fisher time (s)"], 1)),
    ("optimizer state MiB", "", lambda r: round(r["optimizer state MiB"], 2)),
    ("signal share", "", lambda r: round(r.get("signal share", 0.0), 4)),  # 0 where no run has a signal
    ("masked unchanged", "", lambda r: r["masked unchanged"]),
]


def overlay_figure(cfg: dict, methods: list[str], out: Path) -> Path | None:
    """Image / truth / prediction per method, for the first examples of each split (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _data(cfg)
    preds = {m: np.load(out / f"pred_{m}.npz") for m in methods if (out / f"pred_{m}.npz").exists()}
    if not preds:
        return None
    splits = [s for s in ("val", "target") if s in data]
    rows = [(s, i) for s in splits for i in range(SHOW)]
    cols = ["image", "truth"] + list(preds)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.6 * len(rows)), squeeze=False)
    norm = input_norm(cfg["encoder"])
    for r, (split, i) in enumerate(rows):
        x, y = data[split]
        img = denormalize(x[i : i + 1], norm)[0]
        panels = [img, y[i]] + [preds[m][split][i] for m in preds]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            if c == 0:
                ax.imshow(img)
            else:
                ax.imshow(img)
                ax.imshow(np.ma.masked_where(panel == 0, panel), cmap="autumn", alpha=0.8, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=7)
            if c == 0:
                ax.set_ylabel("source" if split == "val" else "target", fontsize=7)
    fig.tight_layout()
    path = out / "overlays.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="gradsel segmentation recipe (Fisher-guided Unet fine-tuning)")
    parser.add_argument("--config", default="demo", help="config name (smoke, demo, full) or YAML path")
    parser.add_argument("--out", default=None, help="output directory (default runs/segmentation/<config>)")
    parser.add_argument("--methods", nargs="*", default=None, help="run only these methods")
    parser.add_argument("--steps", type=int, default=None, help="train every run for this many steps (sizing)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="run only these seeds")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out/jobs, run the rest")
    args = parser.parse_args(argv)
    name, cfg = common.load_config(args.config, CONFIGS)
    common.override(cfg, max_steps=args.steps, seeds=args.seeds, steps_key="steps")
    methods = args.methods or cfg["methods"]
    known = common.method_names(cfg, ALL_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise GradselError(f"unknown methods {unknown}: choose from {known}")
    if "ird" in methods and "ird" not in gradsel.list_policies():
        print("policy 'ird' is not registered in this gradsel: skipping the ird row")
        methods = [m for m in methods if m != "ird"]
    out = Path(args.out or f"runs/segmentation/{name}")
    out.mkdir(parents=True, exist_ok=True)
    data = _data(cfg)  # renders and caches once, before the runs
    print({k: (v[0].shape, float(v[1].mean())) for k, v in data.items()})
    jobs = [(cfg, m, s, str(out)) for s in cfg["seeds"] for m in methods]
    t0 = time.perf_counter()
    rows = common.run_all(run_one, jobs, cfg.get("isolate", True), out, resume=args.resume, describe=lambda r: (
        f"{r['method']} seed {r['seed']}: IoU {r['in-domain IoU']:.3f} "
        f"zero-shot {r.get('zero-shot IoU', float('nan')):.3f}, share {r['trainable share']:.4f}, "
        f"{r['train time (s)']:.1f} s"))
    wall = time.perf_counter() - t0
    metrics = ["in-domain IoU", "in-domain Dice", "validation IoU", "zero-shot IoU", "zero-shot Dice", "train time (s)", "train CPU (s)",
               "step (s)", "backward (s)", "backward first 10% (s)", "backward last 10% (s)", "peak train MiB",
               "fisher time (s)", "final trainable share", "mean trainable share", "run time (s)",
               "optimizer state MiB", "signal share"]
    agg = common.aggregate(rows, [m for m in metrics if any(m in r for r in rows)],
                           ["trainable params", "trainable share"])
    common.write_csv(agg, out / "summary.csv")
    cols = [c for c in COLUMNS if "zero-shot" not in c[0] or "zero-shot IoU" in rows[0]]
    if "validation IoU" in rows[0]:  # the config renders a validation split
        cols.insert(2, ("validation IoU", "", lambda r: common.pm(r["validation IoU"], r["validation IoU std"], 3)))
    md = common.summary_table(agg, cols, markdown=True)
    (out / "summary.md").write_text(f"# Segmentation recipe: {name}\n\nEncoder {cfg['encoder']}, dataset "
                                    f"{cfg['dataset'].get('name', 'cracks')}; {common.wall_note(wall, rows)}.\n\n{md}\n")
    common.plot_xy(agg, "mean trainable share", "in-domain IoU", out / "iou_vs_share.png",
                   xlabel="time-averaged trainable share of parameters", ylabel="in-domain IoU",
                   title=f"Unet-{cfg['encoder']} ({name})")
    if "zero-shot IoU" in rows[0]:
        common.plot_xy(agg, "mean trainable share", "zero-shot IoU", out / "zero_shot_iou_vs_share.png",
                       xlabel="time-averaged trainable share of parameters", ylabel="zero-shot IoU (target domain)",
                       title=f"Unet-{cfg['encoder']} zero-shot ({name})")
    overlay_figure(cfg, [m for m in methods if m in ("full", "decoder_only", "fish", "jsdrift", "random")], out)
    hist = out / f"jsdrift_history_seed{cfg['seeds'][0]}.json"
    if hist.exists():
        plot_drift(json.loads(hist.read_text()), out / "jsdrift_drift.png",
                   title="jsdrift on the Unet: drift per encoder stage / decoder block")
    print(common.summary_table(agg, cols, markdown=False))
    print(f"\n{common.wall_note(wall, rows)}; results in {out}/")
    return out
