"""What jsdrift's freezing saves: step and backward time before and after freezing, in one process.

Run: ``python -m benchmarks.jsdrift_speed``. Writes ``benchmarks/results/jsdrift_speed.{md,json}``.

For the BERT-from-config and the smp Unet, four ways to train the same steps:

- ``unfrozen``: plain training (the baseline);
- ``mask-only``: the same groups frozen the way the reference FisherAdapTune code does it, by zeroing their
  gradients (the full backward still runs);
- ``jsdrift frozen``: the same groups frozen by gradsel's jsdrift mechanism (``requires_grad`` off, optimizer
  state released), so autograd skips their weight gradients and everything below the last trainable layer;
- ``jsdrift live``: a real jsdrift run from scratch (probe Fisher every ``interval`` steps), reporting the
  step time before and after its first freeze and the probe estimate's share of the step time.

The frozen groups for the first three are the first half of the parameter tensors in model order
(embeddings and early layers / the encoder's first stages): the usual candidates for early freezing.

``python -m benchmarks.jsdrift_speed --e2e`` measures time to quality instead (``jsdrift_e2e.{md,json}``):
the same number of steps on a synthetic but learnable task (BERT: the label says whether a marker
token occurs; Unet: the mask is where the first channel is positive) for full fine-tuning, jsdrift's
``preset="fast"`` and jsdrift's default probe source; total wall time with every measurement included,
the signal's share of it (``history["signal_time"]``), the trainable share at the end, the mean training
loss of the last 10 steps and the accuracy on 4 held-out batches.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import gradsel
from gradsel.policies.jsdrift import JSDrift

from .common import best_time, machine, md_table, write


def bert(device):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        num_labels=2, attn_implementation="eager")).to(device)
    g = torch.Generator().manual_seed(0)

    def batch():  # label: whether the marker token 999 occurs (inserted at a random place in half the rows)
        ids = torch.randint(1000, 30522, (16, 64), generator=g)
        labels = torch.randint(0, 2, (16,), generator=g)
        where = torch.randint(0, 64, (16,), generator=g)
        ids[labels.bool(), where[labels.bool()]] = 999
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}

    return "BERT 4×256, batch 16, seq 64", model, batch, lambda m, b: m(**b).loss


def unet(device):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).to(device)
    g = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randn(8, 3, 128, 128, generator=g)
        return x.to(device), (x[:, 0] > 0).long().to(device)

    return "smp Unet-resnet18, batch 8, 128×128", model, batch, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def _timed_steps(model, batch, loss_fn, opt, steps, handle=None, warmup=3):
    """Median step and backward seconds over ``steps`` (after ``warmup`` steps)."""
    total, backward = [], []
    for i in range(steps + warmup):
        b = batch()
        t0 = time.perf_counter()
        loss = loss_fn(model, b)
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        if handle is not None:
            handle.step()
        t3 = time.perf_counter()
        if i >= warmup:
            total.append(t3 - t0)
            backward.append(t2 - t1)
    return _median(total), _median(backward)


def _zero_grad(p: torch.Tensor) -> None:
    p.grad.zero_()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def run(device="cpu", steps=8, rounds=3):
    rows = []
    for make in (bert, unet):
        label, model, batch, loss_fn = make(device)
        model.train()
        names = [n for n, _ in model.named_parameters()]
        early = names[: len(names) // 2]
        share = sum(model.get_parameter(n).numel() for n in early) / sum(p.numel() for p in model.parameters())
        init = {k: v.clone() for k, v in model.state_dict().items()}

        def fresh():
            model.load_state_dict(init)
            return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def unfrozen():
            return _timed_steps(model, batch, loss_fn, fresh(), steps)

        def mask_only():  # zero the gradients of the early half (hooks); the full backward still runs
            opt = fresh()
            hooks = [model.get_parameter(n).register_post_accumulate_grad_hook(_zero_grad) for n in early]
            try:
                return _timed_steps(model, batch, loss_fn, opt, steps)
            finally:
                for h in hooks:
                    h.remove()

        def jsdrift_frozen():  # the same groups frozen through jsdrift's mechanism
            opt = fresh()
            sel = gradsel.select(model, [batch()], JSDrift(interval=10 ** 9, probe_samples=4), progress=False)
            handle = sel.apply(model, opt)
            handle.controller._freeze(early)
            try:
                return _timed_steps(model, batch, loss_fn, opt, steps, handle)
            finally:
                handle.remove()

        # the three interleaved, `rounds` times, best of each: load from other jobs hits all three alike
        results = {"plain": [], "mask": [], "frozen": []}
        for _ in range(rounds):
            for key, fn in (("plain", unfrozen), ("mask", mask_only), ("frozen", jsdrift_frozen)):
                results[key].append(fn())
        (t_plain, b_plain), (t_mask, b_mask), (t_frozen, b_frozen) = (
            (min(t for t, _ in results[k]), min(b for _, b in results[k])) for k in ("plain", "mask", "frozen"))

        # a live run: probe Fisher every `interval` steps, relative rule so that some groups settle
        opt = fresh()
        interval = 5
        policy = JSDrift(interval=interval, probe_samples=8, rule="relative", lam=-0.5, patience=1, floor=0.3)
        sel = gradsel.select(model, [batch()], policy, progress=False)
        handle = sel.apply(model, opt)
        probe_time = best_time(lambda: handle.controller._scores(), repeats=2, warmup=0, device=device)
        per_step, first_freeze = [], None
        for _ in range(6 * interval):
            b = batch()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model, b).backward()
            opt.step()
            handle.step()
            per_step.append(time.perf_counter() - t0)
            if first_freeze is None and handle.controller.frozen:
                first_freeze = handle.steps
        live_share = handle.controller.trainable_share()
        # steps that ran a probe measurement are excluded from the before/after means
        plain_steps = [t for i, t in enumerate(per_step, 1) if i % interval]
        cut = first_freeze or len(per_step)
        before = [t for i, t in enumerate(per_step, 1) if i % interval and i <= cut] or plain_steps
        after = [t for i, t in enumerate(per_step, 1) if i % interval and i > cut] or [float("nan")]
        handle.remove()

        rows.append({
            "model": label, "frozen share (first half of tensors)": share,
            "unfrozen step (s)": t_plain, "unfrozen backward (s)": b_plain,
            "mask-only step (s)": t_mask, "mask-only backward (s)": b_mask,
            "jsdrift frozen step (s)": t_frozen, "jsdrift frozen backward (s)": b_frozen,
            "backward saved vs mask-only": 1 - b_frozen / b_mask, "step saved vs unfrozen": 1 - t_frozen / t_plain,
            "live: first freeze at step": first_freeze, "live: trainable share after 30 steps": live_share,
            "live: step before freeze (s)": _median(before), "live: step after (s)": _median(after),
            "probe estimate (s)": probe_time, "probe share of step time (interval 5)": probe_time / interval / t_plain,
            "probe share of step time (interval 50)": probe_time / 50 / t_plain,
        })
        print(rows[-1], flush=True)
    return rows


def _accuracy(model, batches, label):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in batches:
            if isinstance(b, dict):
                pred = model(**b).logits.argmax(-1)
                y = b["labels"]
            else:
                pred = model(b[0]).argmax(1)
                y = b[1]
            right += int((pred == y).sum())
            total += y.numel()
    model.train()
    return right / total


E2E_METHODS = {"full": None, "jsdrift fast": dict(preset="fast"),
               # the fast preset as it was before sample= / min_group= / recheck=: every element measured
               "jsdrift fast, exact signal": dict(preset="fast", sample="all", min_group=0, recheck=False),
               "jsdrift probe (defaults)": dict()}
E2E_MODELS = {"bert": bert, "unet": unet}
#: command-line keys for --e2e-methods
E2E_KEYS = {"full": "full", "fast": "jsdrift fast", "fast-exact": "jsdrift fast, exact signal",
            "probe": "jsdrift probe (defaults)"}


def run_e2e(device="cpu", steps=100, methods=None, models=None):
    """Time to quality: the same steps for full and jsdrift, wall time including every measurement."""
    rows = []
    methods = {E2E_KEYS[k]: E2E_METHODS[E2E_KEYS[k]] for k in (methods or E2E_KEYS)}
    for make in (E2E_MODELS[k] for k in (models or E2E_MODELS)):
        label, model, batch, loss_fn = make(device)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        held_out = [batch() for _ in range(4)]
        probe = [batch() for _ in range(4)]
        stream = [batch() for _ in range(steps)]  # the same batches for every method
        for method, options in methods.items():
            model.load_state_dict(init)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=5e-4 if "BERT" in label else 1e-3, weight_decay=0.01)
            t0 = time.perf_counter()
            handle = None
            if options is not None:
                sel = gradsel.select(model, probe, "jsdrift", progress=False, **options)
                handle = sel.apply(model, opt)
            losses, first = [], None
            for b in stream:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, b)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if handle is not None:
                    handle.step()
                    if first is None and handle.controller.frozen:
                        first = handle.steps
            if device != "cpu":
                torch.cuda.synchronize()
            total = time.perf_counter() - t0
            h = handle.controller.history if handle is not None else {"signal_time": 0.0, "probe_time": 0.0}
            row = {"model": label, "method": method, "steps": steps, "total time (s)": total,
                   "load average": os.getloadavg()[0],
                   "signal time (s)": h["signal_time"], "signal share": h["signal_time"] / total,
                   "first freeze at step": first,
                   "final trainable share": handle.controller.trainable_share() if handle is not None else 1.0,
                   "loss, last 10 steps": sum(losses[-10:]) / 10, "held-out accuracy": _accuracy(model, held_out, label)}
            if handle is not None:
                handle.remove()
            rows.append(row)
            print(row, flush=True)
        base = next((r for r in rows if r["model"] == label and r["method"] == "full"), None)
        for r in rows:
            if r["model"] == label and base is not None:
                r["time vs full"] = r["total time (s)"] / base["total time (s)"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the three fixed runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--e2e", action="store_true", help="time to quality (jsdrift_e2e.md) instead")
    parser.add_argument("--e2e-steps", type=int, default=100)
    parser.add_argument("--e2e-methods", nargs="+", choices=list(E2E_KEYS), default=None,
                        help="methods to run (default: all); 'full' is the time baseline")
    parser.add_argument("--e2e-models", nargs="+", choices=list(E2E_MODELS), default=None)
    parser.add_argument("--e2e-out", default="jsdrift_e2e", help="results name under benchmarks/results/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if args.e2e:
        rows = run_e2e(args.device, args.e2e_steps, args.e2e_methods, args.e2e_models)
        cols = ["model", "method", "steps", "total time (s)", "time vs full", "signal time (s)", "signal share",
                "first freeze at step", "final trainable share", "loss, last 10 steps", "held-out accuracy",
                "load average"]
        extra = "".join(f" --{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
                        for k, v in (("e2e_methods", args.e2e_methods), ("e2e_models", args.e2e_models),
                                     ("e2e_out", args.e2e_out if args.e2e_out != "jsdrift_e2e" else None)) if v)
        md = (f"# jsdrift: time to quality\n\nMachine: {machine()}. Command: `python -m benchmarks.jsdrift_speed --e2e "
              f"--e2e-steps {args.e2e_steps} --device {args.device}{f' --threads {args.threads}' if args.threads else ''}"
              f"{extra}`; load average at the start {load:.1f} (and after each run, last column). The same "
              f"{args.e2e_steps} batches for each method (AdamW); total "
              "wall time includes selection, every probe or training-gradient measurement and the freezes; signal "
              "share is the controller's recorded `signal_time` over the total.\n\n" + md_table(rows, cols) + "\n")
        write(args.e2e_out, rows, md, args.device)
        return
    rows = run(args.device, args.steps, args.rounds)
    fixed = ["model", "frozen share (first half of tensors)", "unfrozen step (s)", "unfrozen backward (s)",
             "mask-only step (s)", "mask-only backward (s)", "jsdrift frozen step (s)", "jsdrift frozen backward (s)",
             "backward saved vs mask-only", "step saved vs unfrozen"]
    live = ["model", "live: first freeze at step", "live: trainable share after 30 steps",
            "live: step before freeze (s)", "live: step after (s)", "probe estimate (s)",
            "probe share of step time (interval 5)", "probe share of step time (interval 50)"]
    md = (f"# jsdrift: what freezing saves\n\nMachine: {machine()}. Command: `python -m benchmarks.jsdrift_speed "
          f"--device {args.device} --steps {args.steps} --rounds {args.rounds}"
          f"{f' --threads {args.threads}' if args.threads else ''}`; load average at the start {load:.1f}. "
          f"Medians over {args.steps} steps after 3 warm-up steps, AdamW, train mode; the same first half of the "
          f"tensors frozen in each of the three fixed runs, which run interleaved {args.rounds} times (best of "
          f"{args.rounds} medians).\n\n"
          "## Same groups frozen three ways\n\n" + md_table(rows, fixed) +
          "\n\n## A live jsdrift run (probe Fisher on 8 samples every 5 steps, relative rule, floor 0.3)\n\n"
          + md_table(rows, live) + "\n")
    write("jsdrift_speed", rows, md, args.device)


if __name__ == "__main__":
    main()
