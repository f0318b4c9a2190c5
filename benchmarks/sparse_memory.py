"""What a sparse selection costs to train: optimizer-state bytes, peak training memory and step time.

Run: ``python -m benchmarks.sparse_memory [--threads 1] [--steps 4]``. Writes
``benchmarks/results/sparse_memory.{md,json}``.

For the BERT-from-config (4 layers, hidden 256, 11.2M parameters) and the smp Unet-resnet18 (14.3M), a
``fish`` selection (Fisher over one batch, new head trained in full with ``always=``) at keep = 0.5%, 5%
and 50%, trained four ways:

- ``dense AdamW``: plain full fine-tuning (no selection), the reference for state bytes;
- ``masked dense``: ``torch.optim.AdamW`` + ``selection.apply(model, opt)`` (gradient hooks and the guard);
- ``SparseAdamW``: ``gradsel.optim.sparse_adamw(selection, model)``;
- ``SparseAdamW + compact grads``: the same with ``compact_grads=True`` (each dense weight gradient is
  gathered to the selected entries and freed as soon as backward has produced it).

State bytes are exact (every tensor the optimizer holds, plus SparseAdamW's int32 indices). The target is
``keep' × dense state + index bytes`` with ``keep'`` the trainable share (selected + head). Peak memory is the
resident-set growth over optimizer creation and ``--steps`` training steps, each configuration in a fresh
process with large blocks through mmap (so freed tensors leave the resident set); parameters and the batch
exist before the measurement starts. Step times are the best of ``--steps`` steps after the measured ones
(the machine is shared; the minimum is the least disturbed):
the whole step (zero_grad, forward, backward, step) and ``optimizer.step()`` alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradsel

from .common import RESULTS, PeakMemory, in_fresh_process, machine, md_table, write

KEEPS = (0.005, 0.05, 0.5)
METHODS = ("dense AdamW", "masked dense", "SparseAdamW", "SparseAdamW + compact grads")


def bert_case():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        num_labels=2, attn_implementation="eager"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (16, 64), generator=g)
    lengths = torch.randint(32, 65, (16,), generator=g)
    mask = (torch.arange(64)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (16,), generator=g)}
    return "BERT 4×256 (11.2M), batch 16, seq 64", model, batch, lambda m, b: m(**b).loss, "classifier.*"


def unet_case():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 128, 128, generator=g)
    batch = (x, (x[:, 0] > 0).long())
    return ("smp Unet-resnet18 (14.3M), batch 8, 128×128", model, batch,
            lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), "segmentation_head.*")


CASES = {"bert": bert_case, "unet": unet_case}


def _make_optimizer(method, model, sel):
    from gradsel.optim import sparse_adamw

    if method == "dense AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-4), None
    if method == "masked dense":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return opt, sel.apply(model, opt)
    return sparse_adamw(sel, model, lr=1e-4, compact_grads=method.endswith("compact grads")), None


def _worker(case, method, sel_path, steps, threads, queue):
    from gradsel.optim import state_bytes

    torch.set_num_threads(threads)
    _, model, batch, loss_fn, _ = CASES[case]()
    model.train()
    sel = gradsel.Selection.load(sel_path, model) if sel_path else None
    times, opt_times = [], []

    def step(opt, record):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model, batch).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if record:
            times.append(t2 - t0)
            opt_times.append(t2 - t1)

    gc.collect()
    with PeakMemory("cpu") as mem:
        opt, handle = _make_optimizer(method, model, sel)
        for _ in range(steps):
            step(opt, False)
    for _ in range(steps):
        step(opt, True)
    queue.put({"peak MiB": mem.mib, "state bytes": state_bytes(opt), "step (s)": min(times),
               "opt.step (s)": min(opt_times)})


def fresh_process(case, method, sel_path, steps, threads) -> dict:
    """One configuration in a fresh process (no allocator caches, no other configuration's leftovers)."""
    return in_fresh_process(_worker, case, method, sel_path, steps, threads)


def run(steps: int, threads: int, cases=("bert", "unet")) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="sparse_memory."))
    for case in cases:
        label, model, batch, loss_fn, always = CASES[case]()
        total = sum(p.numel() for p in model.parameters())
        fisher = gradsel.fisher(model, batch, params=gradsel.params.resolve(model, None, always), progress=False)
        dense = fresh_process(case, "dense AdamW", None, steps, threads)
        rows.append({"model": label, "keep": 1.0, "method": "dense AdamW", "trainable": total, **dense,
                     "state / dense": 1.0})
        print(rows[-1], flush=True)
        for keep in KEEPS:
            sel = gradsel.select(model, batch, "fish", keep=keep, always=always, fisher=fisher, progress=False)
            path = sel.save(tmp / f"{case}-{keep}.safetensors")
            trainable = sel.trainable()
            indexed = sum(int(m.sum()) for m in sel.masks.values() if not bool(m.all()))
            target = trainable / total * dense["state bytes"] + 4 * indexed
            for method in METHODS[1:]:
                out = fresh_process(case, method, str(path), steps, threads)
                row = {"model": label, "keep": keep, "method": method, "trainable": trainable, **out,
                       "state / dense": out["state bytes"] / dense["state bytes"]}
                if method.startswith("SparseAdamW"):
                    row["state / target"] = out["state bytes"] / target
                rows.append(row)
                print(row, flush=True)
    return rows


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))


def minilm():
    """all-MiniLM-L6-v2 through the NLP recipe's loader, else a BERT config with its shapes."""
    try:
        from recipes.nlp.model import load_model

        return "all-MiniLM-L6-v2 (recipes/nlp/model.py)", load_model(num_labels=2)[1]
    except Exception as exc:  # noqa: BLE001 - the recipe or its weights package may be absent
        from transformers import BertConfig, BertForSequenceClassification

        print(f"MiniLM not loadable ({exc}); using a config with its shapes", flush=True)
        torch.manual_seed(0)
        return "BERT config with MiniLM shapes (6×384, vocab 30522)", BertForSequenceClassification(BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, num_labels=2))


def sizes(tmp: Path) -> list[dict]:
    """Artifact bytes of a FISH sparse delta, LoRA and SHiRA adapters and a full checkpoint, on MiniLM shapes.

    Sizes depend on shapes and counts only: the selections here are random (seeded) with the recipe's
    budget, and "training" adds 1e-3 to every selected entry.
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from gradsel.delta import SparseDelta
    from gradsel.integrations.peft import shira_config, shira_select

    label, model = minilm()
    total = sum(p.numel() for p in model.parameters())
    base = copy.deepcopy(model.state_dict())
    rows = []

    def add(artifact, trained, nbytes, note=""):
        rows.append({"model": label, "artifact": artifact, "trained elements": trained, "MiB": nbytes / 2**20,
                     "share of full": nbytes / full, "note": note})
        print(rows[-1], flush=True)

    full_path = tmp / "full.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(full_path))
    full = full_path.stat().st_size
    add("full fine-tune checkpoint (safetensors)", total, full)
    for keep in (0.005, 0.05):
        tuned = copy.deepcopy(model)
        sel = gradsel.select(tuned, None, "random", keep=keep, always="classifier.*", progress=False)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                p[sel.masks[name]] += 1e-3
        for with_base in (False, True):
            delta = SparseDelta.from_models(sel, tuned, base, base_values=with_base)
            size = delta.save(tmp / f"delta-{keep}-{with_base}.safetensors").stat().st_size
            add(f"sparse delta, keep {keep:.1%}" + (" + base values" if with_base else ""), sel.trainable(), size,
                "exact unmerge without the base" if with_base else "unmerge needs the base state dict")
    for targets in (["query", "value"], ["query", "key", "value", "dense"]):
        lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                               modules_to_save=["classifier"]))
        trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        out = tmp / f"lora-{len(targets)}"
        lora.save_pretrained(out)
        add(f"LoRA r8 adapter ({', '.join(targets)})", trained, _file_bytes(out), "peft save_pretrained")
    tuned = copy.deepcopy(model)
    names = [n for n, m in tuned.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in ("query", "value")]
    fake = {f"{n}.weight": torch.rand(dict(tuned.named_modules())[n].weight.shape) for n in names}
    sel = shira_select(tuned, None, r=8, params=list(fake), always="classifier.*", fisher=fake)
    shira = get_peft_model(tuned, shira_config(sel, tuned))
    out = tmp / "shira"
    shira.save_pretrained(out)
    add("FISH SHiRA r8 adapter (query, value)", sum(p.numel() for p in shira.parameters() if p.requires_grad),
        _file_bytes(out), "peft save_pretrained; int32 row+col indices")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps, then as many timed steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two OpenMP threads spin-wait)")
    parser.add_argument("--only", choices=("memory", "sizes"), help="run one part, keep the other's saved rows")
    args = parser.parse_args()
    t0 = time.perf_counter()
    saved = json.loads((RESULTS / "sparse_memory.json").read_text()) if args.only else {}
    results = {"command": f"python -m benchmarks.sparse_memory --threads {args.threads} --steps {args.steps}",
               "machine": f"{machine()}; {args.threads} torch thread(s) per run"}
    results["memory"] = run(args.steps, args.threads) if args.only != "sizes" else saved["memory"]
    if args.only == "sizes":
        results.update(command=saved["command"], machine=saved["machine"])
    with tempfile.TemporaryDirectory() as tmp:
        results["sizes"] = sizes(Path(tmp)) if args.only != "memory" else saved["sizes"]
    rows = results["memory"]
    for r in rows:
        r["state MiB"] = r["state bytes"] / 2**20
        masked = next((m for m in rows if m["model"] == r["model"] and m["keep"] == r["keep"]
                       and m["method"] == "masked dense"), None)
        if masked is not None:
            r["step / masked"] = r["step (s)"] / masked["step (s)"]
            r["opt.step / masked"] = r["opt.step (s)"] / masked["opt.step (s)"]
    cols = ["model", "keep", "method", "trainable", "state MiB", "state / dense", "state / target", "peak MiB",
            "step (s)", "step / masked", "opt.step (s)", "opt.step / masked"]
    md = (f"# Sparse optimizer state and sparse artifacts\n\nMachine: {results['machine']}. Command: "
          f"`{results['command']}` ({time.perf_counter() - t0:.0f} s).\n\n## Optimizer state, peak memory, step "
          "time\n\nfish selections (Fisher over one batch, new head in full); AdamW lr 1e-4, train mode. "
          "`state / target`: state bytes over keep' × dense state + int32 index bytes (keep' = trainable share; "
          "target ≤ 1.2). `peak MiB`: resident-set growth over optimizer creation (and `apply`) and "
          f"{args.steps} steps, a fresh process each. Step times: best of {args.steps} steps after those; "
          "`step / masked` < 1 is faster than the masked dense path.\n\n" + md_table(rows, cols)
          + "\n\n## Artifact size\n\nBytes on disk (safetensors, plus adapter_config.json for peft). Sizes "
          "depend on shapes and counts only (random selections of the recipe's budget).\n\n"
          + md_table(results["sizes"], ["model", "artifact", "trained elements", "MiB", "share of full", "note"])
          + "\n")
    write("sparse_memory", results, md)


if __name__ == "__main__":
    main()
