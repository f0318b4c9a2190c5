"""The hooks engine beyond the four main models: windowed attention (Swin, MaxViT) and timm's MetaFormers
(ConvNeXt, PoolFormer) and the depthwise-separable MobileNetV2 / EfficientNet, against vmap, the loop and the
batched floor.

Run: ``python -m benchmarks.fisher_zoo [--rounds 3] [--models swin tv_swin maxvit convnext poolformer]``. Writes
``benchmarks/results/fisher_zoo.md``.

Swin cuts each sample into windows that dim 0 holds one after another; the hooks engine reads them as more
tokens of that sample. torchvision's Swin passes its attention's qkv/proj weights to ``F.linear`` itself, and
HF Swin's relative-position bias module returns one bias for all samples: both join the attention's
module-local gradient. ConvNeXt and PoolFormer normalise with timm's LayerNorm2d / GroupNorm1, which have
rules; their layer scales (ConvNeXt's block ``gamma``, PoolFormer's ``Scale``) are read from the batched forward
(``gradsel/fisher/engines/elementwise.py``). Depthwise convolutions (ConvNeXt's 7×7, MobileNet's and
EfficientNet's 3×3/5×5) get each sample's weight gradient from one depthwise convolution over the chunk; timm's
BatchNormAct2d (a norm, then an elementwise activation) has a rule. *fallback tensors*: the candidates that
still go to the whole-model fallback. Times are the best of ``rounds`` interleaved rounds, after one warm-up
call of each (the hooks engine's one-off checks run there).

Further entries: ``nf_resnet``, ``nfnet``, ``bit`` (timm's weight-standardised convolutions; ``resnet50`` is the
plain ResNet-50 beside them), ``tv_vit`` (torchvision's ViT: ``nn.MultiheadAttention``, a ``pos_embedding`` held by
its Encoder), ``wav2vec2`` (HF, a parameter that eval never reads above the whole encoder), ``levit``, ``coat``,
``t5``, ``linknet``, ``tv_mobilenet``, ``hf_swin``, ``lstm`` and ``gru`` (a batch-first
bidirectional ``nn.LSTM`` / ``nn.GRU``), ``lstm3`` (three such LSTM layers), ``lstm_seq_first`` (the LSTM
sequence first, torch's default layout), ``lstm_packed`` (a ``PackedSequence`` of lengths 32-128), ``torch_transformer`` (torch's
``nn.TransformerEncoder``, sequence first), ``bart`` and ``opt`` (HF models whose embeddings are ``nn.Embedding``
subclasses: BART's scaled token embedding, tied to its LM head, and both models' learned positions, which compute
their own position ids), ``tnt`` (timm's TNT: each patch's 16 pixels as tokens of their own, windows of dim 0
that hold 16 rows, as many as the samples at ``--batch 16``), ``wav2vec2_ctc`` (HF wav2vec2 for speech recognition:
a CTC loss over padded audio and transcripts, which vmap cannot run), ``r3d`` and ``r2plus1d`` (torchvision's video
ResNets: 3-D convolutions, full and split into spatial and temporal ones).
"""

from __future__ import annotations

import argparse
import importlib
import time

import torch
import torch.nn.functional as F

import gradsel

from .common import machine, md_table, write

COLUMNS = ["model", "batch", "candidates", "fallback tensors", "floor (s)", "hooks (s)", "vmap (s)", "loop (s)",
           "hooks / floor", "hooks / vmap", "hooks / loop", "note"]


def _swin():
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=112)
    return "timm swin_tiny, 112²", model, 112


def _tv_swin():
    import torchvision

    return "torchvision swin_t, 112²", torchvision.models.swin_t(weights=None, num_classes=3), 112


def _maxvit():
    import torchvision

    return "torchvision maxvit_t, 224²", torchvision.models.maxvit_t(weights=None, num_classes=3), 224


def _timm(name: str, label: str, size: int = 112, **options):
    def make():
        import timm

        return label, timm.create_model(name, pretrained=False, num_classes=3, **options), size

    return make


def _tv_vit():
    import torchvision

    # torchvision's ViT-S/16 shape at 112²: nn.MultiheadAttention, and pos_embedding held by the Encoder
    model = torchvision.models.VisionTransformer(image_size=112, patch_size=16, num_layers=12, num_heads=6,
                                                 hidden_dim=384, mlp_dim=1536, num_classes=3)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: no gradient below
    return "torchvision ViT-S/16, 112²", model, 112


def _wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    config = Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            conv_dim=(128, 128, 128), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=3)

    def batch(n: int, g: torch.Generator) -> dict:
        return {"input_values": torch.randn(n, 16000, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}

    return "HF wav2vec2 (d 256, 4 layers), 16000 samples", Wav2Vec2ForSequenceClassification(config), batch


def _video(name: str):
    def make():
        import torchvision

        def batch(n: int, g: torch.Generator) -> tuple:  # 8 frames of 64²
            return torch.randn(n, 3, 8, 64, 64, generator=g), torch.randint(0, 3, (n,), generator=g)

        return f"torchvision {name}, 8×64²", getattr(torchvision.models.video, name)(num_classes=3), batch

    return make


def _wav2vec2_ctc():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(vocab_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, conv_dim=(128, 128, 128), conv_stride=(5, 2, 2),
                            conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            feat_extract_norm="layer", ctc_loss_reduction="mean", pad_token_id=0)

    def batch(n: int, g: torch.Generator) -> dict:  # padded audio of 10000-16000 samples, transcripts of 20-40
        mask = (torch.arange(16000) < torch.randint(10000, 16001, (n, 1), generator=g)).long()
        labels = torch.randint(1, 32, (n, 40), generator=g)
        labels[torch.arange(40) >= torch.randint(20, 41, (n, 1), generator=g)] = -100
        return {"input_values": torch.randn(n, 16000, generator=g) * mask, "attention_mask": mask, "labels": labels}

    return "HF wav2vec2 for CTC (d 256, 4 layers), 10000-16000 samples", Wav2Vec2ForCTC(config), batch


class _RnnClassifier(torch.nn.Module):
    def __init__(self, cell, vocab: int = 2000, dim: int = 128, hidden: int = 256, layers: int = 1,
                 batch_first: bool = True, packed: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = cell(dim, hidden, num_layers=layers, batch_first=batch_first, bidirectional=True)
        self.head = torch.nn.Linear(2 * hidden, 3)
        self.batch_first, self.packed = batch_first, packed

    def forward(self, ids):
        e = self.embed(ids)
        if self.packed:  # each sample's length: its tokens before the padding id 0
            from torch.nn.utils.rnn import pack_padded_sequence

            e = pack_padded_sequence(e, (ids != 0).sum(1).cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(e if self.batch_first or self.packed else e.transpose(0, 1))
        h = h[0] if isinstance(h, tuple) else h  # an LSTM's (h, c)
        return self.head(torch.cat([h[-2], h[-1]], 1))  # the top layer's two directions


def _rnn(cell, label, layers=1, batch_first=True, packed=False):
    def make():
        def batch(n: int, g: torch.Generator) -> tuple:
            ids = torch.randint(1, 2000, (n, 128), generator=g)
            if packed:  # lengths 32-128, the rest padding (id 0)
                lengths = torch.randint(32, 129, (n,), generator=g)
                ids[torch.arange(128) >= lengths[:, None]] = 0
            return ids, torch.randint(0, 3, (n,), generator=g)

        stack = f"{layers}-layer " if layers > 1 else ""
        order = ", packed, lengths 32-128" if packed else "" if batch_first else ", sequence first"
        return (f"{stack}bi-{label} text classifier (embed 128, hidden 256), seq 128{order}",
                _RnnClassifier(cell, layers=layers, batch_first=batch_first, packed=packed), batch)
    return make


def _hf_swin():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=224, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], num_labels=3)
    return "HF Swin (embed 32), 224²", _Logits(SwinForImageClassification(config)), 224


class _Logits(torch.nn.Module):
    """An HF image classifier called as ``model(pixels)``, returning its logits (the default cross-entropy)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def _tv_mobilenet():
    import torchvision

    return "torchvision mobilenet_v2, 112²", torchvision.models.mobilenet_v2(weights=None, num_classes=3), 112


def _linknet():
    import segmentation_models_pytorch as smp

    model = smp.Linknet("resnet18", encoder_weights=None, classes=3)
    return "smp Linknet-resnet18 (logits averaged over the image), 128²", _Pooled(model), 128


class _Pooled(torch.nn.Module):
    """A segmentation model's per-pixel logits averaged over the image: one class per image, so that every model
    here takes the same cross-entropy."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).mean((2, 3))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

    def batch(n: int, g: torch.Generator) -> dict:
        """Padded source snippets of 32-64 tokens and targets of 2-16 (-100 past each target's end)."""
        ids = torch.randint(2, 32000, (n, 64), generator=g)
        mask = (torch.arange(64)[None] < torch.randint(32, 65, (n, 1), generator=g)).long()
        labels = torch.randint(2, 32000, (n, 16), generator=g)
        labels = labels.masked_fill(torch.arange(16)[None] >= torch.randint(2, 17, (n, 1), generator=g), -100)
        return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}

    return "HF T5 seq2seq (d 256, 4+4 layers), source 64, target 16", T5ForConditionalGeneration(config), batch


def _seq2seq_batch(vocab: int, source: int = 64, target: int = 16):
    def batch(n: int, g: torch.Generator) -> dict:
        """Padded source snippets of half to all of ``source`` tokens and targets of 2 to ``target`` (-100 past each
        target's end)."""
        ids = torch.randint(4, vocab, (n, source), generator=g)
        mask = (torch.arange(source)[None] < torch.randint(source // 2, source + 1, (n, 1), generator=g)).long()
        labels = torch.randint(4, vocab, (n, target), generator=g)
        labels = labels.masked_fill(torch.arange(target)[None] >= torch.randint(2, target + 1, (n, 1), generator=g),
                                    -100)
        return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask, "labels": labels}

    return batch


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=8000, d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                        max_position_embeddings=128, scale_embedding=True)
    return ("HF BART seq2seq (d 256, 3+3 layers, scaled token embedding tied to the LM head, learned positions), "
            "source 64, target 16", BartForConditionalGeneration(config), _seq2seq_batch(8000))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                       max_position_embeddings=128, word_embed_proj_dim=256)

    def batch(n: int, g: torch.Generator) -> dict:
        """Right-padded texts of 32-64 tokens, the padding out of the labels."""
        ids = torch.randint(4, 8000, (n, 64), generator=g)
        mask = (torch.arange(64)[None] < torch.randint(32, 65, (n, 1), generator=g)).long()
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask, "labels": labels}

    label = "HF OPT causal LM (d 256, 4 layers, learned positions from the mask), seq 32-64"
    return label, OPTForCausalLM(config), batch


class _TorchTransformer(torch.nn.Module):
    """torch's own ``nn.TransformerEncoder`` in its default layout (``batch_first=False``) over token ids, with a
    padding mask, mean-pooled into a classifier."""

    def __init__(self, vocab: int = 2000, dim: int = 256, layers: int = 4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, ids):
        pad = ids == 0
        h = self.encoder(self.embed(ids).transpose(0, 1), src_key_padding_mask=pad)  # (T, n, D)
        return self.head(h.masked_fill(pad.t()[..., None], 0).sum(0) / (~pad).sum(1, keepdim=True))


def _torch_transformer():
    def batch(n: int, g: torch.Generator) -> tuple:
        ids = torch.randint(1, 2000, (n, 64), generator=g)
        ids[torch.arange(64) >= torch.randint(32, 65, (n, 1), generator=g)] = 0
        return ids, torch.randint(0, 3, (n,), generator=g)

    return "torch nn.TransformerEncoder (d 256, 4 layers, batch_first=False), seq 32-64", _TorchTransformer(), batch


MODELS = {"swin": _swin, "tv_swin": _tv_swin, "maxvit": _maxvit,
          "convnext": _timm("convnext_atto", "timm convnext_atto, 112²"),
          "poolformer": _timm("poolformer_s12", "timm poolformer_s12, 112²"),
          "mobilenet": _timm("mobilenetv2_100", "timm mobilenetv2_100, 112²"),
          "efficientnet": _timm("efficientnet_b0", "timm efficientnet_b0, 112²"),
          "levit": _timm("levit_128s", "timm levit_128s, 224²", 224),
          "coat": _timm("coat_lite_tiny", "timm coat_lite_tiny, 112²", img_size=112),
          "nf_resnet": _timm("nf_resnet26", "timm nf_resnet26, 112²"),
          "nfnet": _timm("dm_nfnet_f0", "timm dm_nfnet_f0, 112²"),
          "bit": _timm("resnetv2_50x1_bit", "timm resnetv2_50x1_bit, 112²"),
          "resnet50": _timm("resnet50", "timm resnet50, 112²"),  # BiT without weight standardisation: a reference
          "tv_vit": _tv_vit, "tv_mobilenet": _tv_mobilenet, "hf_swin": _hf_swin, "linknet": _linknet, "t5": _t5,
          "wav2vec2": _wav2vec2, "lstm": _rnn(torch.nn.LSTM, "LSTM"), "gru": _rnn(torch.nn.GRU, "GRU"),
          "lstm3": _rnn(torch.nn.LSTM, "LSTM", layers=3),
          "lstm_seq_first": _rnn(torch.nn.LSTM, "LSTM", batch_first=False),
          "lstm_packed": _rnn(torch.nn.LSTM, "LSTM", packed=True), "torch_transformer": _torch_transformer,
          "bart": _bart, "opt": _opt, "tnt": _timm("tnt_s_patch16_224", "timm tnt_s_patch16_224, 224²", 224),
          "wav2vec2_ctc": _wav2vec2_ctc, "r3d": _video("r3d_18"), "r2plus1d": _video("r2plus1d_18")}


def hooks_and_fallen(model, batch, **options) -> tuple[dict, set[str]]:
    """The hooks engine's estimate and the candidates it left to its whole-model fallback."""
    hooks = importlib.import_module("gradsel.fisher.engines.hooks")
    seen: set[str] = set()
    call = hooks.HooksEngine.__call__

    def spy(self, chunk):
        out = call(self, chunk)
        seen.update(self.fallen_back)
        return out

    hooks.HooksEngine.__call__ = spy
    try:
        return gradsel.fisher(model, batch, engine="hooks", progress=False, **options), seen
    finally:
        hooks.HooksEngine.__call__ = call


def run(models: list[str], n: int, rounds: int) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        label, model, size = MODELS[name]()
        model.eval()
        g = torch.Generator().manual_seed(1)
        if callable(size):  # a batch of the model's own (a dict: its loss is the model's)
            batch = size(n, g)
        else:
            batch = (torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))

        def floor():
            model.zero_grad(set_to_none=True)
            if isinstance(batch, dict):
                model(**batch).loss.backward()
            else:
                F.cross_entropy(model(batch[0]), batch[1]).backward()

        ways = {"floor": floor}
        for engine in ("hooks", "vmap", "loop"):
            ways[engine] = lambda e=engine: gradsel.fisher(model, batch, engine=e, chunk_size=n, progress=False)
        failed = {}
        for k, fn in list(ways.items()):
            try:
                fn()
            except gradsel.GradselError as exc:  # vmap cannot run T5's encoder-decoder attention
                failed[k] = str(exc).split(": ", 1)[-1][:160]
                del ways[k]
        best = {k: float("inf") for k in ways}
        best.update({k: float("nan") for k in failed})
        for _ in range(rounds):
            for k, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        rows.append({"model": label, "batch": n, "candidates": sum(1 for _ in model.parameters()),
                     "fallback tensors": len(hooks_and_fallen(model, batch)[1]),
                     **{f"{k} (s)": v for k, v in best.items()},
                     "hooks / floor": best["hooks"] / best["floor"], "hooks / vmap": best["hooks"] / best["vmap"],
                     "hooks / loop": best["hooks"] / best["loop"],
                     **({"note": "; ".join(f"{k}: {v}" for k, v in failed.items())} if failed else {})})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="fisher_zoo", help="results file name (benchmarks/results/<out>.md)")
    args = parser.parse_args()
    rows = run(args.models, args.batch, args.rounds)
    command = "python -m benchmarks.fisher_zoo " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items())
    md = (f"# Fisher beyond the main four: hooks engine vs vmap, loop and floor\n\nMachine: {machine()}. Command: "
          f"`{command}`. float32, eval mode; best of {args.rounds} interleaved rounds after a warm-up call each; "
          "*floor*: one batched forward+backward.\n\n" + md_table(rows, COLUMNS) + "\n")
    write(args.out, rows, md)


if __name__ == "__main__":
    main()
