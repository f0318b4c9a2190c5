"""A small end-to-end run on the embedded defaults: Fisher, FISH selection, masked training.

``python -m recipes.demo`` (what ``make demo`` runs until a recipe replaces it). Builds a small BERT from
a config and a synthetic token task where the label depends on a few tokens, so nothing is downloaded.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def main() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    import gradsel

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        num_labels=2, attn_implementation="eager"))
    g = torch.Generator().manual_seed(0)

    def batch(n=32):
        ids = torch.randint(5, 1000, (n, 24), generator=g)
        labels = (ids[:, :4] < 500).sum(1).ge(2).long()  # depends on the first four tokens
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    probe = [batch() for _ in range(8)]
    t0 = time.perf_counter()
    scores = gradsel.fisher(model, probe)
    print(f"Fisher over {scores.num_samples} samples ({scores.engine} engine): {time.perf_counter() - t0:.2f} s")
    sel = gradsel.select(model, policy="fish", keep=0.005, fisher=scores, always="classifier.*")
    print(sel.summary(by=3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    with sel.apply(model, opt) as handle:
        for step in range(60):
            b = batch()
            loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            handle.step()
            if step % 20 == 0 or step == 59:
                print(f"step {step:3d}  loss {loss.item():.3f}")
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    held = all(torch.equal(p.detach()[~sel.masks[n]], before[n][~sel.masks[n]]) for n, p in model.named_parameters())
    print(f"elements changed by training: {moved:,} (trainable by the selection: {sel.trainable():,}); "
          f"masked entries unchanged: {held}")
    model.eval()
    with torch.no_grad():
        b = batch(512)
        acc = (model(**b).logits.argmax(-1) == b["labels"]).float().mean().item()
    print(f"accuracy on 512 fresh samples: {acc:.3f} (majority class {max(b['labels'].float().mean().item(), 1 - b['labels'].float().mean().item()):.3f})")


if __name__ == "__main__":
    main()
