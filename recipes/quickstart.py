"""The main job of ``make demo``: gradsel's point in about three minutes on two CPU cores.

1. the Fisher of a real pretrained model (all-MiniLM-L6-v2, offline) on Rotten Tomatoes reviews, taken after
   a short warm-up of the new classifier head (a Fisher measured through a random head says little);
2. FISH Mask at 0.5% of the encoder plus the head, and its summary;
3. the same short fine-tune three ways, each in a fresh process so that its peak memory is its own: the head
   alone (the baseline), FISH Mask through the sparse optimizer, and full fine-tuning;
4. one table (terminal and ``summary.md``) and one PNG: accuracy, trainable parameters, peak training memory,
   step time and the size of what one ships (the sparse delta, the head, or the whole model).

``python -m recipes.quickstart [--steps N] [--out DIR]``. The full comparisons are the NLP and segmentation
recipes (``python -m recipes.nlp --config demo|full``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import gradsel

from . import common
from .nlp.data import encode, loader, make_task
from .nlp.model import load_model

METHODS = {"head only": "head", "FISH Mask 0.5%": "fish", "full fine-tuning": "full"}
LR = {"head": 2e-3, "fish": 2e-3, "full": 1e-4}
KEEP = 0.005


def _data(max_train: int, max_test: int, max_length: int):
    task = make_task("sentiment", seed=0, max_train=max_train, max_test=max_test)
    tokenizer, _ = load_model(seed=0)
    return task, encode(tokenizer, task.train_texts, task.train_labels, max_length=max_length), \
        encode(tokenizer, task.test_texts, task.test_labels, max_length=max_length)


def _head_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("classifier.")]


def _loop(model: nn.Module, batches, steps: int, opt, desc: str) -> float:
    """Train ``steps`` steps; returns the mean step time (s) after the first step."""
    model.train()
    times = []
    it = common.cycle(batches)
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False):
        b = next(it)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    return sum(times[1:]) / max(1, len(times) - 1)


@torch.no_grad()
def _accuracy(model: nn.Module, test) -> float:
    model.eval()
    right = sum(int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                     == b["labels"]).sum()) for b in loader(test, batch_size=128))
    return right / len(test)


def _warm_head(model: nn.Module, batches, steps: int) -> None:
    """Train only the new head for a few steps (in place)."""
    head = set(_head_names(model))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    _loop(model, batches, steps, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR["head"]),
          "warm-up (head)")
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])


def run_method(method: str, cfg: dict, sel_path: str | None) -> dict:
    """One training run, in its own process: returns a row of the table."""
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    _, model = load_model(seed=0)
    _, train, test = _data(cfg["max_train"], cfg["max_test"], cfg["max_length"])
    batches = list(loader(train, batch_size=cfg["batch_size"], shuffle=True, seed=0))
    _warm_head(model, batches, cfg["warmup"])  # every method starts from the same warmed head
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sel = None
    if method == "head":
        head = set(_head_names(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[method], weight_decay=0.01)
    elif method == "fish":
        sel = gradsel.Selection.load(sel_path, model)
        opt = sel.optimizer(model, lr=LR[method], weight_decay=0.01)  # state for the selection only
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR[method], weight_decay=0.01)
    with common.PeakRSS() as mem:
        step_time = _loop(model, batches, cfg["steps"], opt, f"train: {method}")
    acc = _accuracy(model, test)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "artifact.safetensors"
        if sel is not None:
            sel.delta(model, base, base_values=False).save(path)
            # nothing outside the selection moved
            moved = sum(int((p.detach() != base[n])[~sel.masks[n]].sum()) for n, p in model.named_parameters()
                        if n in sel.masks)
            assert moved == 0, f"{moved} masked entries moved"
        else:
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous() for n, p in trained.items()}, str(path))
        size = path.stat().st_size
    count = sel.trainable() if sel is not None else sum(p.numel() for p in trained.values())
    return {"accuracy": acc, "trainable params": count, "peak train MiB": mem.mib, "step time (s)": step_time,
            "artifact MiB": size / 2**20}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="gradsel in three minutes: Fisher, selection, masked fine-tune")
    parser.add_argument("--steps", type=int, default=40, help="training steps per method")
    parser.add_argument("--samples", type=int, default=128, help="samples in the Fisher estimate")
    parser.add_argument("--out", default="runs/quickstart", help="output folder")
    parser.add_argument("--warmup", type=int, default=10, help="head-only steps before the Fisher (and each run)")
    parser.add_argument("--max-test", type=int, default=400, help="test reviews")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    cfg = {"max_train": 1000, "max_test": args.max_test, "max_length": 40, "batch_size": 32, "steps": args.steps,
           "warmup": args.warmup, "threads": args.threads}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    print("1/3  the Fisher of all-MiniLM-L6-v2 (pretrained, offline) on Rotten Tomatoes reviews")
    task, train, _ = _data(cfg["max_train"], cfg["max_test"], cfg["max_length"])
    print(task.summary())
    _, model = load_model(seed=0)
    batches = list(loader(train, batch_size=cfg["batch_size"], shuffle=True, seed=0))
    _warm_head(model, batches, cfg["warmup"])
    probe = list(loader(torch.utils.data.TensorDataset(*(t[: args.samples] for t in train.tensors)), batch_size=16))
    t0 = time.perf_counter()
    head = _head_names(model)
    scores = gradsel.fisher(model, probe, params=[n for n, _ in model.named_parameters() if n not in head])
    fisher_time = time.perf_counter() - t0
    print(f"     {scores}, {fisher_time:.1f} s")

    print(f"2/3  FISH Mask: the top {KEEP:.1%} of the encoder by Fisher, plus the new head in full")
    sel = gradsel.select(model, None, "fish", keep=KEEP, fisher=scores, params=list(scores), always=head)
    print(sel.summary(by=4))
    sel_path = out / "selection.safetensors"
    sel.save(sel_path)

    print(f"3/3  the same {args.steps}-step fine-tune three ways, each in a fresh process")
    rows = []
    for label, method in METHODS.items():
        row = common.run_jobs(run_method, [(method, cfg, str(sel_path))], isolate=True)[0]
        rows.append({"method": label, **row})
        print(f"     {label}: accuracy {row['accuracy']:.3f}, {row['trainable params']:,} trainable")
    full = rows[-1]
    for r in rows:
        r["memory ÷ full"] = r["peak train MiB"] / full["peak train MiB"]
    cols = ["method", "accuracy", "trainable params", "peak train MiB", "memory ÷ full", "step time (s)",
            "artifact MiB"]
    fmt = [{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else (f"{r[c]:,}" if isinstance(r[c], int) else r[c]))
            for c in cols} for r in rows]
    from gradsel.report import table

    wall = time.perf_counter() - t_all
    (out / "summary.md").write_text(
        f"# gradsel quickstart\n\nall-MiniLM-L6-v2 on {task.name}; {args.steps} steps of batch {cfg['batch_size']} per "
        f"method; Fisher over {scores.num_samples} samples in {fisher_time:.1f} s; wall time {wall:.0f} s.\n\n"
        + table(fmt, cols, markdown=True) + "\n")
    _plot(rows, out / "quickstart.png")
    print("\n" + table(fmt, cols))
    print(f"\nwall time {wall:.0f} s; table, plot and selection in {out}/")
    print(f"next: gradsel inspect {sel_path} --plot {out}/selection.png")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = [r["method"] for r in rows]
    for ax, key, title in zip(axes, ["accuracy", "peak train MiB", "artifact MiB"],
                              ["test accuracy", "peak training memory (MiB)", "shipped artifact (MiB)"]):
        ax.bar(names, [r[key] for r in rows], color=["#999999", "#d62728", "#1f77b4"])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
