"""The models the benchmarks measure, built from configs with random weights (nothing is downloaded).

A :class:`Case` holds a model and how to feed it: ``batch(n, seed)`` in the form ``gradsel.fisher`` reads
(an HF dict with ``labels``, or ``(images, targets)``), the same batch as plain tensors, the logits and the
per-sample loss, so that tools that take neither form (opacus, BackPACK, nngeometry, hand-written vmap)
can be driven the same way. ``bert_case`` / ``unet_case`` keep the tuple form that ``fisher_speed`` and
``ird_cost`` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    """A model with its batches.

    ``text`` cases take ``(input_ids, attention_mask, labels)``; image cases ``(images, targets)`` with
    class targets ``(N,)`` or segmentation targets ``(N, H, W)``.
    """

    label: str
    model: nn.Module
    n: int
    text: bool
    make: Callable[[int, int], tuple[torch.Tensor, ...]]  # (n, seed) -> tensors, targets last

    def tensors(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """The batch as plain tensors (floating inputs in the model's dtype), targets last."""
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        return tuple((t.to(dtype) if t.is_floating_point() else t).to(device)
                     for t in self.make(self.n if n is None else n, seed))

    def batch(self, n: int | None = None, seed: int = 0) -> Any:
        """The batch in the form ``gradsel.fisher`` reads."""
        return self.as_batch(self.tensors(n, seed))

    def as_batch(self, ts: tuple[torch.Tensor, ...]) -> Any:
        """Plain tensors (as :meth:`tensors` gives them) in the form ``gradsel.fisher`` reads."""
        if self.text:
            return {"input_ids": ts[0], "attention_mask": ts[1], "labels": ts[2]}
        return ts

    def logits(self, model: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        """The logits that ``model`` (the model, a wrapper, or any callable taking the model's arguments)
        gives for the inputs (the tensors without the targets)."""
        if self.text:
            return model(input_ids=inputs[0], attention_mask=inputs[1]).logits
        return model(inputs[0])

    @staticmethod
    def losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each sample's own loss ``(N,)``: cross-entropy, averaged over a segmentation target's pixels."""
        return F.cross_entropy(logits, targets, reduction="none").reshape(len(targets), -1).mean(1)

    def floor(self, b: tuple[torch.Tensor, ...]) -> None:
        """One ordinary batched forward+backward of the batch (tensor form): no per-sample gradients."""
        self.model.zero_grad(set_to_none=True)
        self.losses(self.logits(self.model, *b[:-1]), b[-1]).mean().backward()


def _bert(device: str, *, layers: int = 4, hidden: int = 256, seq: int = 64, vocab: int = 30522,
          n: int = 16) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden, num_labels=2,
                        max_position_embeddings=max(512, seq), attn_implementation="eager")
    model = BertForSequenceClassification(config).to(device)

    def make(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(min(1000, vocab // 2), vocab, (n, seq), generator=g)
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        return ids * mask, mask, torch.randint(0, 2, (n,), generator=g)

    return Case(f"BERT ({layers} layers, hidden {hidden}), seq {seq}", model, n, True, make)


def _images(classes: int, size: int, segmentation: bool):
    def make(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        shape = (n, size, size) if segmentation else (n,)
        return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, shape, generator=g)
    return make


def _unet(device: str, *, size: int = 128, n: int = 8) -> Case:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).to(device)
    return Case(f"smp Unet-resnet18, {size}×{size}", model, n, False, _images(2, size, True))


def _resnet50(device: str, *, size: int = 128, n: int = 8) -> Case:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=10).to(device)
    return Case(f"torchvision ResNet-50, {size}×{size}", model, n, False, _images(10, size, False))


def _vit(device: str, *, size: int = 96, n: int = 16) -> Case:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, num_classes=10).to(device)
    return Case(f"timm vit_tiny, img {size}", model, n, False, _images(10, size, False))


# name -> (builder, full-size options, small options: the float64 correctness check and --quick)
CASES: dict[str, tuple[Callable[..., Case], dict, dict]] = {
    "bert": (_bert, {}, {"layers": 2, "hidden": 64, "seq": 16, "vocab": 500, "n": 3}),
    "unet": (_unet, {}, {"size": 32, "n": 2}),
    "resnet50": (_resnet50, {}, {"size": 32, "n": 2}),
    "vit": (_vit, {}, {"size": 32, "n": 3}),
}


def build(name: str, device: str = "cpu", small: bool = False, dtype: torch.dtype = torch.float32) -> Case:
    """The case ``name`` of :data:`CASES`, full size or small, in eval mode and ``dtype``."""
    make, full, tiny = CASES[name]
    case = make(device, **(tiny if small else full))
    case.model.to(dtype).eval()
    return case


def _as_tuple(case: Case):
    return case.label, case.model, case.batch, case.n, lambda b: _floor_of(case, b)


def _floor_of(case: Case, b: Any) -> None:
    case.model.zero_grad(set_to_none=True)
    if case.text:
        case.model(**b).loss.backward()
    else:
        F.cross_entropy(case.model(b[0]), b[1]).backward()


def bert_case(device: str):
    """``(label, model, batch(n, seed), n, floor(batch))`` for the BERT 4×256, seq 64, batch 16."""
    return _as_tuple(_bert(device))


def unet_case(device: str, size: int = 128):
    """``(label, model, batch(n, seed), n, floor(batch))`` for the smp Unet-resnet18, batch 8."""
    return _as_tuple(_unet(device, size=size))
