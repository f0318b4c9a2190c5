"""Small models and batches shared by the tests: built from configs, no downloads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


def mlp_batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallCNN()
    # non-trivial running statistics, as after training
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def cnn_batch(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


class TinyAttention(nn.Module):
    """Embedding + MultiheadAttention + LayerNorm + classifier."""

    def __init__(self, vocab: int = 30, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


def attention(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyAttention()


def attention_batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (n, 7), generator=g), torch.randint(0, 2, (n,), generator=g)


def wav2vec2(seed: int = 0):
    """HF wav2vec2 from config, eval mode: its body module holds ``masked_spec_embed``, which only SpecAugment
    reads in training, beside the whole encoder (and a weight-normed positional convolution)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2, num_labels=3)
    return Wav2Vec2ForSequenceClassification(config).eval()


def wav2vec2_batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(n, 200, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def wav2vec2_ctc(seed: int = 0):
    """HF wav2vec2 for speech recognition (a CTC head, the loss averaged over each target's length), eval mode."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    config = Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                            ctc_loss_reduction="mean", pad_token_id=0)
    return Wav2Vec2ForCTC(config).eval()


def wav2vec2_ctc_batch(n: int = 4, seed: int = 1):
    """Padded audio (an attention mask) and padded transcripts (-100 and the blank, both ignored)."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.tensor([200, 150, 180, 120, 200, 160])[:n]
    mask = (torch.arange(200)[None] < frames[:, None]).long()
    labels = torch.randint(1, 12, (n, 5), generator=g)
    labels[1, 3:], labels[2, 4:] = -100, 0
    return {"input_values": torch.randn(n, 200, generator=g) * mask, "attention_mask": mask, "labels": labels}


class MaskedAttention(nn.Module):
    """nn.MultiheadAttention as models use it: a causal self-attention with a padding mask (bool masks), a
    cross-attention to a memory (another key and value, a float mask), called twice, and torch's
    TransformerEncoderLayer (its own attention inside) with a padding mask; token 0 is the padding."""

    def __init__(self, vocab: int = 30, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.memory = nn.Linear(dim, dim)
        self.self_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 4, batch_first=True, bias=False)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens):
        h = self.embed(tokens)
        pad = tokens == 0
        t = tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        a, _ = self.self_attn(h, h, h, key_padding_mask=pad, attn_mask=causal)  # weights returned, unused
        h = h + a
        mem = torch.tanh(self.memory(h[:, :3]))
        bias = torch.linspace(-1, 1, 3, dtype=h.dtype, device=h.device).expand(t, 3)
        for _ in range(2):
            c, _ = self.cross(h, mem, mem, attn_mask=bias, need_weights=False)
            h = h + c
        h = self.layer(h, src_key_padding_mask=pad)
        return self.head(h.mean(1))


def masked_attention(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MaskedAttention()


def masked_attention_batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (n, 7), generator=g)
    tokens[1, 5:] = 0  # padded
    tokens[3, 4:] = 0
    return tokens, torch.randint(0, 2, (n,), generator=g)


def bert(seed: int = 0, *, layers: int = 2, hidden: int = 32, vocab: int = 100):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2,
                        attn_implementation="eager")
    return BertForSequenceClassification(config)


def bert_batch(n: int = 6, t: int = 10, seed: int = 1, vocab: int = 100):
    """HF dict batch with real padding (varying lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def _moved(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with its trainable parameters moved off their initial values (a LoRA-like B of zero has no signal)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def bert_loha(seed: int = 0):
    """The BERT with peft LoHa: each adapter's weight is a Hadamard product of two low-rank products, formed by a
    custom ``autograd.Function`` without a vmap rule (torch.func cannot run it); adapters moved off their start."""
    from peft import LoHaConfig, get_peft_model

    return _moved(get_peft_model(bert(seed), LoHaConfig(r=2, target_modules=["query", "value"])), seed + 1)


def bert_qa(seed: int = 0):
    """The BERT for extractive question answering (start and end logits; the loss from start and end positions)."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    return BertForQuestionAnswering(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=64, attn_implementation="eager"))


def bert_qa_batch(n: int = 6, t: int = 10, seed: int = 1):
    """A padded dict batch with answer spans (no ``labels``: ``start_positions`` and ``end_positions``)."""
    batch = bert_batch(n, t, seed)
    del batch["labels"]
    g = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(0, 3, (n,), generator=g)
    return {**batch, "start_positions": start, "end_positions": start + torch.randint(0, 3, (n,), generator=g)}


def bert_lora(seed: int = 0, *, train_b: bool = True):
    """The BERT wrapped with peft LoRA; B made non-zero so that A gets gradients (as after a warm-up)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(bert(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                  lora_dropout=0.1))
    if train_b:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model


def bert_prompt(seed: int = 0, *, encoder: bool = False):
    """The BERT with peft prompt tuning (``encoder``: p-tuning, an MLP over the prompt embedding). peft computes one
    sample's prompts and repeats them for the batch; prompts and head moved off their initial values."""
    import peft

    config = (peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=16) if encoder
              else peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    return _moved(peft.get_peft_model(bert(seed), config), seed + 1)


def unet(seed: int = 0):
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=3)


def unet_batch(n: int = 4, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n, size, size), generator=g)


# -- the wider engine matrix (issue 15) --------------------------------------------------------------------

def vit(seed: int = 0):
    """timm ViT (tiny, 2 blocks) at 32×32: pos_embed and cls_token are parameters of the top module."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3,
                              depth=2)
    with torch.no_grad():  # timm starts pos_embed/cls_token near zero; make them matter
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
    return model


def image_batch(n: int = 5, size: int = 32, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def resnet(seed: int = 0):
    """torchvision ResNet-18 (in-place ``out += identity`` and ReLU(inplace=True)); BatchNorm statistics set."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model


def gpt2(seed: int = 0, *, vocab: int = 50):
    """GPT-2 LM, 2 layers, LM head tied to the token embedding (``lm_head.weight is wte.weight``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM", attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def gpt2_batch(n: int = 5, t: int = 8, seed: int = 1, vocab: int = 50):
    """LM batch with right padding: labels are the ids, -100 on padding (each sample's loss: its own mean)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def t5(seed: int = 0, *, vocab: int = 40):
    """A small T5 classifier: each stack's first attention looks up one relative-position bias for all samples
    (a (q, k) bucket table, no sample dimension) and returns it (1, heads, q, k) to every later layer."""
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, num_labels=2, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, attn_implementation="eager")
    return T5ForSequenceClassification(config)


def t5_seq2seq(seed: int = 0, *, vocab: int = 40):
    """The same T5 as a sequence-to-sequence LM (its own loss): its decoder builds a key/value cache by default."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, attn_implementation="eager")
    assert config.use_cache
    return T5ForConditionalGeneration(config)


def t5_seq2seq_batch(n: int = 4, t: int = 10, target: int = 6, seed: int = 1, vocab: int = 40):
    batch = t5_batch(n, t, seed, vocab)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(2, vocab, (n, target), generator=g)
    ends = torch.randint(2, target + 1, (n, 1), generator=g)
    return {**batch, "labels": labels.masked_fill(torch.arange(target)[None] >= ends, -100)}


def t5_batch(n: int = 4, t: int = 10, seed: int = 1, vocab: int = 40):
    """Right-padded snippets, each ending in the eos token that T5's classification head reads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(n), lengths - 1] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


def bart(seed: int = 0, *, vocab: int = 40):
    """A small BART seq2seq LM (its own loss): ``nn.Embedding`` subclasses around the lookups (a token embedding that
    scales its rows, shared by encoder and decoder and tied to the LM head; learned positions that form their own
    position ids from the input's shape)."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
                        scale_embedding=True, attn_implementation="eager")
    model = BartForConditionalGeneration(config)
    assert model.lm_head.weight is model.model.shared.weight and type(model.model.shared) is not nn.Embedding
    return model


def bart_batch(n: int = 4, t: int = 10, target: int = 6, seed: int = 1, vocab: int = 40):
    """T5's batch with BART's padding id (1) in the padded source positions."""
    batch = t5_seq2seq_batch(n, t, target, seed, vocab)
    return {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)}


def opt(seed: int = 0, *, vocab: int = 50):
    """A small OPT causal LM: its learned positions (an ``nn.Embedding`` subclass) look up ids counted from the
    attention mask; the LM head is tied to the token embedding."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                       max_position_embeddings=16, word_embed_proj_dim=16, attn_implementation="eager")
    return OPTForCausalLM(config)


def gemma3(seed: int = 0, *, vocab: int = 50):
    """A small Gemma 3 causal LM: sliding-window attention (window 3) beside full attention, both masks built by the
    model from the 2-D attention mask; a scaled token embedding tied to the LM head."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=3,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=16,
                              pad_token_id=0, attn_implementation="eager")
    return Gemma3ForCausalLM(config)


def modernbert(seed: int = 0, *, vocab: int = 50):
    """A small ModernBERT classifier: local attention (window 4) in one layer, global in the other."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, global_attn_every_n_layers=2, local_attention=4,
                              max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2, num_labels=2, attn_implementation="eager")
    return ModernBertForSequenceClassification(config)


def modernbert_batch(n: int = 6, t: int = 10, seed: int = 1, vocab: int = 50):
    """BERT's batch, each sample at least 8 tokens long: in float64 a padded query whose local window holds only padding
    is NaN in the model itself."""
    batch = bert_batch(n, t, seed, vocab)
    mask = batch["attention_mask"]
    mask[:, :8] = 1
    ids = batch["input_ids"]
    return {**batch, "input_ids": ids.masked_fill((ids == 0) & (mask == 1), 3)}


def mpt(seed: int = 0, *, vocab: int = 50):
    """A small MPT causal LM (ALiBi), which reads the 2-D attention mask itself."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(seed)
    return MptForCausalLM(MptConfig(d_model=16, n_heads=2, n_layers=2, expansion_ratio=2, vocab_size=vocab,
                                    max_seq_len=16))


class ConvOffset(nn.Module):
    """A parameter added to a conv output, and a pos-embed-like parameter added after flatten/transpose."""

    def __init__(self, c: int = 6, t: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, stride=2)
        self.offset = nn.Parameter(torch.randn(1, c, 1, 1) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, t, c) * 0.5)
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = self.conv(x) + self.offset  # (N, C, 4, 4)
        y = y.flatten(2).transpose(1, 2) + self.pos  # (N, T, C)
        return self.head(self.norm(torch.tanh(y)).mean(1))


def conv_offset(seed: int = 0):
    torch.manual_seed(seed)
    return ConvOffset()


class Depthwise(nn.Module):
    """Depthwise-separable convolutions (groups = channels), GroupNorm, Conv1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.gn = nn.GroupNorm(4, 16)
        self.dw1d = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.gn(self.pw(self.dw(x))))
        x = torch.relu(self.dw1d(x.flatten(2)))
        return self.head(x.mean(2))


def depthwise(seed: int = 0):
    torch.manual_seed(seed)
    return Depthwise()


class Twice(nn.Module):
    """The same Linear (and the same LayerNorm) applied twice in one forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.norm(self.shared(h)))
        h = torch.tanh(self.norm(self.shared(h)))
        return self.head(h)


def twice(seed: int = 0):
    torch.manual_seed(seed)
    return Twice()


class _SharedBlock(nn.Module):
    def __init__(self, pe: nn.Module, c: int):
        super().__init__()
        self.pe = pe  # the parent's module, registered here too: one module under two names
        self.mix = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return torch.tanh(self.mix(self.pe(x) + x))


class SharedByTwoParents(nn.Module):
    """timm CoaT's layout: one depthwise conv position encoding held by the network and by each of its blocks."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.blocks = nn.ModuleList([_SharedBlock(self.pe, c) for _ in range(2)])
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def shared_by_two_parents(seed: int = 0):
    torch.manual_seed(seed)
    return SharedByTwoParents()


class _GainConv(nn.Module):
    """A conv whose weight is scaled by a gain first (timm's ScaledStdConv2d in small): no rule, a local gradient."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3) * 0.3)
        self.gain = nn.Parameter(torch.rand(c_out, 1, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, padding=1)


class LocalOutputWrittenInPlace(nn.Module):
    """timm NF-ResNet's layout: a local module's output goes straight into an in-place activation."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1 = _GainConv(3, c)
        self.conv2 = _GainConv(c, c)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.conv2(self.act(self.conv1(x)))
        return self.head(self.act(x).mean((2, 3)))


def local_output_written_in_place(seed: int = 0):
    torch.manual_seed(seed)
    return LocalOutputWrittenInPlace()


class StdConvs(nn.Module):
    """timm's weight-standardised convolutions (BiT's StdConv2d, the NF-nets' ScaledStdConv2d and their "SAME"
    kin with dynamic padding), grouped, depthwise and 1×1, with gains away from 1: every route of the conv rule
    (one sample per kernel call at 9×9, matmul at the strided layers' few positions, depthwise) taken back
    through the standardisation."""

    def __init__(self, c: int = 4):
        from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

        super().__init__()
        self.stem = StdConv2d(3, c, 3, bias=True)
        self.grouped = ScaledStdConv2d(c, 2 * c, 3, groups=2, bias=True)
        self.depthwise = ScaledStdConv2d(2 * c, 2 * c, 3, groups=2 * c)
        self.down = ScaledStdConv2dSame(2 * c, c, 3, stride=2, padding="SAME")
        self.same = StdConv2dSame(c, c, 3, stride=2, padding="SAME", bias=True)
        self.point = ScaledStdConv2d(c, c, 1)
        self.head = nn.Linear(c, 3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(getattr(m, "gain", None), nn.Parameter):
                    m.gain.copy_(torch.rand(m.gain.shape) + 0.5)

    def forward(self, x):
        x = F.gelu(self.grouped(F.gelu(self.stem(x))))
        x = self.down(F.gelu(self.depthwise(x)))
        x = self.point(F.gelu(self.same(x)))
        return self.head(x.mean((2, 3)))


def std_convs(seed: int = 0):
    torch.manual_seed(seed)
    return StdConvs()


class Checkpointed(nn.Module):
    """An MLP + conv whose blocks run under ``torch.utils.checkpoint`` (non-reentrant) in every mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.LayerNorm(12), nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.tanh(self.conv(t)), x, use_reentrant=False).mean((2, 3))
        h = checkpoint(self.block, h, use_reentrant=False)
        return self.head(h)


def checkpointed(seed: int = 0):
    torch.manual_seed(seed)
    return Checkpointed()


class SeqFirst(nn.Module):
    """A ``batch_first=False`` transformer layer: inside, the samples sit on dim 1, the tokens on dim 0."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: (batch, tokens, 6)
        return self.head(self.enc(self.inp(x).transpose(0, 1)).mean(0))


class Recurrent(nn.Module):
    """A GRU (batch first) under an LSTM (sequence first) under Elman RNNs (tanh, ReLU) and a projected LSTM: modules
    that torch.func cannot run per sample; the hooks engine has a batched rule for all but the projected LSTM, which
    goes to the loop."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 8, batch_first=True)
        self.lstm = nn.LSTM(8, 8)
        self.elman = nn.RNN(8, 8, num_layers=2, bidirectional=True)
        self.relu = nn.RNN(16, 4, nonlinearity="relu", batch_first=True)
        self.projected = nn.LSTM(8, 6, proj_size=3)
        self.head = nn.Linear(16 + 4 + 3, 3)

    def forward(self, x):
        h, _ = self.gru(x)
        h, _ = self.lstm(h.transpose(0, 1))
        e, _ = self.elman(h)
        r, hr = self.relu(e.transpose(0, 1))
        p, _ = self.projected(h)
        return self.head(torch.cat([e[-1], hr[0], p[-1]], 1))


class SeqFirstRnns(nn.Module):
    """LSTMs and GRUs in torch's default layout (``batch_first=False``: steps on dim 0, samples on dim 1): a
    2-layer bidirectional LSTM started from states made of the input, every final state read; a one-way LSTM
    without biases called twice; a bidirectional GRU whose final states feed the head; a 2-layer GRU; a 2-layer
    bidirectional Elman RNN (tanh)."""

    def __init__(self):
        super().__init__()
        self.start = nn.Linear(6, 5)
        self.bi = nn.LSTM(6, 5, num_layers=2, bidirectional=True)
        self.one = nn.LSTM(10, 4, bias=False)
        self.gru = nn.GRU(6, 4, bidirectional=True)
        self.deep_gru = nn.GRU(4, 3, num_layers=2)
        self.elman = nn.RNN(6, 3, num_layers=2, bidirectional=True)
        self.head = nn.Linear(20 + 5 + 4 + 4 + 8 + 3 + 6, 3)

    def forward(self, x):  # (n, 7, 6), read as (7, n, 6)
        t = x.transpose(0, 1)
        s = torch.tanh(self.start(x.mean(1)))  # (n, 5)
        h0 = s.unsqueeze(0).expand(4, -1, -1).contiguous()
        seq, (h, c) = self.bi(t, (h0, torch.zeros_like(h0)))
        out, _ = self.one(seq)
        again, _ = self.one(seq.flip(0))
        g, gh = self.gru(t)
        d, _ = self.deep_gru(torch.tanh(g[..., :4]))
        e, _ = self.elman(t)
        return self.head(torch.cat([h.transpose(0, 1).flatten(1), c[-1], out[-1], again.mean(0), gh.transpose(0, 1)
                                    .flatten(1), d.mean(0), e.mean(0)], 1))


class PackedRnns(nn.Module):
    """LSTMs, GRUs and RNNs over ``PackedSequence``s of each sample's own length (read from its values), unsorted:
    a 2-layer bidirectional LSTM from given states, its output unpacked and every final state read; an Elman RNN
    over that packed output; a bidirectional GRU packed sequence first."""

    def __init__(self):
        super().__init__()
        self.start = nn.Linear(6, 5)
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.elman = nn.RNN(10, 3)
        self.gru = nn.GRU(6, 4, bidirectional=True)
        self.head = nn.Linear(10 + 20 + 5 + 8 + 3, 3)

    def forward(self, x):  # (n, 7, 6)
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        lengths = 1 + (x[:, 0, 0].abs() * 10).long() % 7
        s = torch.tanh(self.start(x.mean(1)))
        h0 = s.unsqueeze(0).expand(4, -1, -1).contiguous()
        out, (h, c) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),
                                (h0, torch.zeros_like(h0)))
        o, _ = pad_packed_sequence(out, batch_first=True)
        _, eh = self.elman(out)
        _, gh = self.gru(pack_padded_sequence(x.transpose(0, 1), lengths, enforce_sorted=False))
        return self.head(torch.cat([o.sum(1), h.transpose(0, 1).flatten(1), c[-1], gh.transpose(0, 1).flatten(1),
                                    eh[0]], 1))


def packed_rnns(seed: int = 0):
    torch.manual_seed(seed)
    return PackedRnns()


def seq_first_rnns(seed: int = 0):
    torch.manual_seed(seed)
    return SeqFirstRnns()


class Lstms(nn.Module):
    """Batch-first LSTMs as classifiers use them: a bidirectional one whose final hidden state feeds the head, a
    one-way one without biases, started from states made of the input (given as ``hx``), whose sequence does, and
    Sequencer's layout: one LSTM over two sequences a sample (overlapping windows), one sample's after another; and
    GRUs: a bidirectional one whose final states feed the head, a one-way one without biases from given states;
    stacked: a 3-layer bidirectional LSTM (every layer's final states read) and a 2-layer GRU; an Elman RNN (ReLU)
    from given states."""

    def __init__(self):
        super().__init__()
        self.bi = nn.LSTM(6, 5, batch_first=True, bidirectional=True)
        self.start = nn.Linear(6, 8)
        self.one = nn.LSTM(10, 4, batch_first=True, bias=False)
        self.rows = nn.LSTM(6, 3, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(6, 4, batch_first=True, bidirectional=True)
        self.gru_one = nn.GRU(8, 3, batch_first=True, bias=False)
        self.stacked = nn.LSTM(6, 3, num_layers=3, batch_first=True, bidirectional=True, dropout=0.5)
        self.stacked_gru = nn.GRU(6, 3, num_layers=2, batch_first=True)
        self.elman = nn.RNN(6, 4, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(2 * 5 + 4 + 6 + 8 + 3 + 6 + 3 + 3 + 4, 3)

    def forward(self, x):  # (n, 7, 6)
        seq, (h, _) = self.bi(x)
        s = torch.tanh(self.start(x.mean(1))).unsqueeze(0)  # (1, n, 8): the states of the one-way LSTM
        out, _ = self.one(seq, (s[..., :4].contiguous(), s[..., 4:].contiguous()))
        windows = torch.stack([x[:, :4], x[:, 3:]], 1).reshape(-1, 4, 6)  # (n·2, 4, 6)
        r, _ = self.rows(windows)
        g, gh = self.gru(x)
        g2, _ = self.gru_one(g, s[..., :3].contiguous())
        st, (sh, _) = self.stacked(x)  # every layer's final states read (dropout between layers: eval mode)
        sg, _ = self.stacked_gru(x)
        _, eh = self.elman(x, s[..., 4:].contiguous())
        return self.head(torch.cat([h[0], h[1], out.mean(1), r.reshape(x.shape[0], -1, 6).mean(1), gh[0], gh[1],
                                    g2.mean(1), st.mean(1), sh.mean(0), sg.mean(1), eh[0]], 1))


def lstms(seed: int = 0):  # and GRUs
    torch.manual_seed(seed)
    return Lstms()


class WindowAttention(nn.Module):
    """Attention inside windows with a learned relative bias (Swin's shape): dim 0 holds windows, not samples;
    ``mask`` (one per window of a sample) as the shifted windows use it."""

    def __init__(self, dim: int = 8, tokens: int = 4):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(tokens, tokens) * 0.1)

    def forward(self, x, mask=None):  # x: (windows, tokens, dim), mask: (windows of one sample, tokens, tokens)
        q, k, v = self.qkv(x).chunk(3, -1)
        att = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + self.bias
        if mask is not None:
            att = (att.view(-1, mask.shape[0], *att.shape[1:]) + mask).view(att.shape)
        return self.proj(att.softmax(-1) @ v)


class Windowed(nn.Module):
    """Tokens on a 4×4 grid cut into four 2×2 windows; ``sample_major``: each sample's windows one after another
    on dim 0 (Swin's window partition), else window-major (the samples interleaved)."""

    def __init__(self, sample_major: bool = True):
        super().__init__()
        self.sample_major = sample_major
        self.embed = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = WindowAttention()
        self.shifted = WindowAttention()
        self.register_buffer("mask", torch.randn(4, 4, 4))
        self.head = nn.Linear(8, 3)

    def _windows(self, x):  # (B, 4, 4, C) -> (B * 4, 4, C)
        b, c = x.shape[0], x.shape[-1]
        w = x.view(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, c)
        return (w if self.sample_major else w.transpose(0, 1)).reshape(-1, 4, c)

    def _merge(self, w, b):
        c = w.shape[-1]
        w = w.view(b, 4, 4, c) if self.sample_major else w.view(4, b, 4, c).transpose(0, 1)
        return w.reshape(b, 2, 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, c)

    def forward(self, x):  # x: (B, 3, 4, 4)
        b = x.shape[0]
        h = self.norm(self.embed(x.permute(0, 2, 3, 1)))
        h = h + self._merge(self.attn(self._windows(h)), b)
        h = h + self._merge(self.shifted(self._windows(h), self.mask if self.sample_major else None), b)
        return self.head(h.mean((1, 2)))


def windowed(seed: int = 0, *, sample_major: bool = True):
    torch.manual_seed(seed)
    return Windowed(sample_major)


def timm_norms(seed: int = 0):
    """timm's LayerNorm2d (channels of NCHW), GroupNorm1 and GroupNorm, torchvision's LayerNorm2d, between
    convolutions."""
    from timm.layers.norm import GroupNorm, GroupNorm1, LayerNorm2d
    from torchvision.models.convnext import LayerNorm2d as TvLayerNorm2d

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4), nn.GELU(), nn.Conv2d(4, 6, 1), GroupNorm1(6),
                          nn.Tanh(), GroupNorm(6, num_groups=2), TvLayerNorm2d(6), nn.Flatten(), nn.Linear(6 * 16, 3))
    with torch.no_grad():  # affine parameters off their initial ones and zeros, so that every rule is exercised
        for m in (model[1], model[4], model[6], model[7]):
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
    return model


class RmsNorms(nn.Module):
    """torch's nn.RMSNorm (eps from the dtype; over the last two dims) and timm's RmsNorm between token Linears."""

    def __init__(self, d: int = 6, t: int = 7):
        from timm.layers.norm import RmsNorm

        super().__init__()
        self.inp = nn.Linear(6, d)
        self.norm = nn.RMSNorm(d)
        self.norm2d = nn.RMSNorm((t, d), eps=1e-5)
        self.timm = RmsNorm(d)
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            for m in (self.norm, self.norm2d, self.timm):
                m.weight.normal_(1, 0.3)

    def forward(self, x):  # (n, t, 6)
        h = self.norm(torch.tanh(self.inp(x)))
        h = self.timm(torch.tanh(self.norm2d(h)))
        return self.head(h.mean(1))


def rms_norms(seed: int = 0):
    torch.manual_seed(seed)
    return RmsNorms()


class NormActDepthwise(nn.Module):
    """timm's norm + activation layers (in-place ReLU6 and SiLU, GELU, a Dropout) between depthwise convolutions:
    stride 2, dilation 2, a channel multiplier of 2, one called twice, a 1-D one; ``padding="same"`` (dilated,
    and an even kernel, which torch pads unevenly) and ``"valid"``."""

    def __init__(self):
        super().__init__()
        from timm.layers.norm_act import BatchNormAct2d, GroupNormAct, LayerNormAct, LayerNormAct2d

        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4, act_layer=nn.ReLU6, inplace=True)
        self.dw = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4)  # two output channels a group
        self.gn = GroupNormAct(8, num_groups=2, act_layer=nn.SiLU, inplace=True)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.ln2d = LayerNormAct2d(8, act_layer=nn.GELU, drop_layer=lambda: nn.Dropout(0.5))
        self.same = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.same_even = nn.Conv2d(8, 8, 2, padding="same")
        self.line = nn.Conv1d(8, 8, 5, padding=1, groups=8)
        self.valid = nn.Conv1d(8, 8, 3, padding="valid")
        self.ln = LayerNormAct(8, act_layer=nn.Tanh)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # running statistics and affine parameters off their initial ones
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            for m in (self.bn, self.gn, self.ln2d, self.ln):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)

    def forward(self, x):
        h = self.gn(self.dw(self.bn(self.stem(x))))
        h = self.ln2d(self.dilated(self.dilated(h)))
        h = self.same_even(torch.tanh(self.same(h)))
        h = self.valid(self.line(h.flatten(2))).transpose(1, 2)
        return self.head(self.ln(h).mean(1))


def norm_act_depthwise(seed: int = 0):
    torch.manual_seed(seed)
    return NormActDepthwise()


class SamePadded(nn.Module):
    """TensorFlow's "SAME" convolutions that pad their input themselves, unevenly at stride 2: smp's
    Conv2dStaticSamePadding (its EfficientNet encoders) and timm's Conv2dSame (its tf_ models), depthwise too."""

    def __init__(self, size: int = 9):
        super().__init__()
        from segmentation_models_pytorch.encoders._efficientnet import Conv2dStaticSamePadding
        from timm.layers.conv2d_same import Conv2dSame

        self.stem = Conv2dStaticSamePadding(3, 6, 3, stride=2, image_size=size)
        self.dw = Conv2dStaticSamePadding(6, 6, 5, groups=6, image_size=(size + 1) // 2)
        self.tf = Conv2dSame(6, 4, 4, stride=2)
        self.tf_dw = Conv2dSame(4, 4, 3, groups=4, dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.dw(torch.tanh(self.stem(x))))
        return self.head(torch.tanh(self.tf_dw(torch.tanh(self.tf(h)))).mean((2, 3)))


def same_padded(seed: int = 0):
    torch.manual_seed(seed)
    return SamePadded()


class TransposedConvs(nn.Module):
    """Transposed convolutions (decoders that upsample by them, as smp's Linknet does), each conv route of its
    weight gradient: few input positions (unfolded), many (one sample at a time, grouped), depthwise with
    dilation, 1×1, with ``output_padding`` and with ``output_size=``, and 1-D."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1)
        self.grouped = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2)
        self.dw = nn.ConvTranspose2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
        self.pw = nn.ConvTranspose2d(4, 4, 1)
        self.sized = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)
        self.line = nn.ConvTranspose1d(4, 3, 3, stride=2)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.grouped(torch.tanh(self.up(x))))
        h = torch.tanh(self.pw(torch.tanh(self.dw(h))))
        s = h[:, :, ::8, ::8]
        h = torch.tanh(self.sized(s, output_size=[2 * s.shape[2], 2 * s.shape[3]]))
        return self.head(self.line(h.flatten(2)).mean(2))


def transposed_convs(seed: int = 0):
    torch.manual_seed(seed)
    return TransposedConvs()


class FlatTokenNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: a BatchNorm1d (running statistics) over tokens flattened into dim 0,
    ``bn(x.flatten(0, 1)).reshape_as(x)``; and one over ``(n·2, C, L)`` rows, each sample's two halves."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.rows_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, 3)
        for bn in (self.bn, self.rows_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.proj(x.flatten(2).transpose(1, 2))  # (n, T, dim)
        h = torch.tanh(self.bn(h.flatten(0, 1)).reshape_as(h))
        n, t, d = h.shape
        h = self.rows_bn(h.transpose(1, 2).reshape(n, d, 2, t // 2).transpose(1, 2).reshape(n * 2, d, t // 2))
        return self.head(torch.tanh(h).reshape(n, 2, d, -1).mean((1, 3)))


def flat_token_norm(seed: int = 0):
    torch.manual_seed(seed)
    return FlatTokenNorm()


class PatchConv(nn.Module):
    """timm's TNT pixel embedding: each image cut into patches that dim 0 holds one sample's after another, then
    convolutions over the patches (strided, depthwise, 1×1)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        n = x.shape[0]
        patches = nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(n * 4, 3, 4, 4)
        h = torch.tanh(self.pw(torch.tanh(self.dw(torch.tanh(self.proj(patches))))))
        return self.head(h.reshape(n, 4, 4, -1).mean((1, 3)))


def patch_conv(seed: int = 0):
    torch.manual_seed(seed)
    return PatchConv()


class RepeatedPosition(nn.Module):
    """XCiT's positional encoding: a convolution over one grid, its output repeated for the batch (the hooks engine
    gives that output a copy per sample, and the repeat repeats each copy in its own row)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 6, 1)
        self.mix = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)
        self.register_buffer("grid", torch.randn(1, 4, 3, 3))

    def forward(self, x):
        pos = self.proj(self.grid).repeat(x.shape[0], 1, 1, 1)
        return self.head(torch.tanh(self.mix(x + pos)).mean((2, 3)))


class IndexedSharedTable(nn.Module):
    """HF Swinv2's continuous position bias: an MLP over one grid of coordinates (a batch of one), its output
    flattened and indexed, so that of a copy per sample only the first copy's rows would be read."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(2, 4)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(20, 3)
        self.register_buffer("coords", torch.randn(1, 7, 2))
        self.register_buffer("index", torch.tensor([3, 0, 6, 2, 2]))

    def forward(self, x):
        bias = self.mlp(self.coords).view(-1, 4)[self.index]  # (5, 4)
        return self.head(torch.tanh(self.proj(x).unsqueeze(-1) + bias).flatten(1))


class RelativeBias(nn.Module):
    """HF Swin's relative-position bias: a table of its own read into one (heads, N, N) bias, no sample dim."""

    def __init__(self, heads: int = 2, tokens: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, heads))
        self.register_buffer("index", torch.randint(0, 7, (tokens * tokens,)))
        self.tokens = tokens

    def get_bias(self):
        return self.table[self.index].view(self.tokens, self.tokens, -1).permute(2, 0, 1)

    def forward(self):
        return self.get_bias()


class BiasedAttention(nn.Module):
    """Attention over (B, 4, 6) tokens whose scores get a :class:`RelativeBias`: from its forward, or (``fused``,
    as timm's MaxViT does) read with ``get_bias()`` and passed to SDPA as ``attn_mask``, the module never run."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.qkv = nn.Linear(6, 18)
        self.bias = RelativeBias()
        self.out = nn.Linear(6, 6)
        self.fused = fused

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, 3)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        if self.fused:
            mixed = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.get_bias())
        else:
            mixed = (q @ k.transpose(-1, -2) / 3 ** 0.5 + self.bias().unsqueeze(0)).softmax(-1) @ v
        return self.out(mixed.transpose(1, 2).flatten(2))


class RelativeBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.attn = BiasedAttention()
        self.fused = BiasedAttention(fused=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.fused(self.attn(self.embed(x).view(-1, 4, 6))).mean(1))


def relative_bias_net(seed: int = 0):
    torch.manual_seed(seed)
    return RelativeBiasNet()


def indexed_shared_table(seed: int = 0):
    torch.manual_seed(seed)
    return IndexedSharedTable()


def repeated_position(seed: int = 0):
    torch.manual_seed(seed)
    return RepeatedPosition()


def grid_batch(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, 3, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


class SmpNorms(nn.Module):
    """smp's LayerNorms: UPerNet's LayerNorm2d, the Mix Transformer's LayerNorm on a feature map and on tokens."""

    def __init__(self):
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import LayerNorm2d
        from segmentation_models_pytorch.encoders.mix_transformer import LayerNorm

        self.conv = nn.Conv2d(3, 4, 3)
        self.ln2d = LayerNorm2d(4)
        self.mit_map = LayerNorm(4)
        self.mit_tokens = LayerNorm(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for m in (self.ln2d, self.mit_map, self.mit_tokens):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)

    def forward(self, x):
        h = self.mit_map(torch.tanh(self.ln2d(self.conv(x))))
        return self.head(self.mit_tokens(torch.tanh(h).flatten(2).transpose(1, 2)).mean(1))


def smp_norms(seed: int = 0):
    torch.manual_seed(seed)
    return SmpNorms()


def seq_first(seed: int = 0):
    torch.manual_seed(seed)
    return SeqFirst()


def recurrent(seed: int = 0):
    torch.manual_seed(seed)
    return Recurrent()


def seq_batch(n: int = 5, t: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class ConvZoo(nn.Module):
    """Convolutions off the common path: circular and reflect padding, groups between 1 and the channels, a
    transposed convolution, a 3-D and a strided dilated 1-D one; InstanceNorm, PReLU, Bilinear, EmbeddingBag."""

    def __init__(self):
        super().__init__()
        self.circ = nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.act = nn.PReLU(4)
        self.vol = nn.Conv3d(1, 2, 3, padding=1)
        self.line = nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2)
        self.bag = nn.EmbeddingBag(10, 4, mode="mean")
        self.head = nn.Bilinear(10, 4, 3)

    def forward(self, x):
        h = self.act(self.inorm(self.up(self.grouped(torch.relu(self.circ(x)))))).mean((2, 3))
        v = self.vol(x[:, :1].unsqueeze(1)).mean((2, 3, 4))
        line = self.line(x.flatten(2)).mean(2)
        ids = (x[:, 0, 0, :4].abs() * 5).long().clamp(max=9)
        return self.head(torch.cat([h, v, line], 1), self.bag(ids))


class VideoConvs(nn.Module):
    """3-D convolutions as video models use them (torchvision's R3D and R(2+1)D): a strided 3×3×3, a (1, 3, 3)
    spatial and a (3, 1, 1) temporal one, torchvision's 3×3×3 subclass, a depthwise one, a strided 1×1×1
    projection, a transposed one, and BatchNorm3d with running statistics."""

    def __init__(self):
        from torchvision.models.video.resnet import Conv3DNoTemporal, Conv3DSimple

        super().__init__()
        self.stem = nn.Conv3d(3, 6, 3, stride=(1, 2, 2), padding=1)
        self.bn = nn.BatchNorm3d(6)
        self.spatial = Conv3DNoTemporal(6, 6)  # (1, 3, 3), no bias
        self.temporal = nn.Conv3d(6, 8, (3, 1, 1), padding=(1, 0, 0))
        self.simple = Conv3DSimple(8, 8)
        self.depthwise = nn.Conv3d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv3d(8, 4, 1, stride=2)
        self.up = nn.ConvTranspose3d(4, 4, 2, stride=2)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):  # (N, 3, frames, H, W)
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.simple(torch.relu(self.temporal(torch.relu(self.spatial(h))))))
        h = self.up(self.project(torch.tanh(self.depthwise(h))))
        return self.head(h.mean((2, 3, 4)))


def video_convs(seed: int = 0):
    torch.manual_seed(seed)
    return VideoConvs()


def video_batch(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def conv_zoo(seed: int = 0):
    torch.manual_seed(seed)
    return ConvZoo()


class ConvTokens(nn.Module):
    """Conv + BatchNorm, then the feature map read as tokens (flatten, transpose) under LayerNorm and a Linear:
    on a batch of one, the gradient reaching the BatchNorm is laid out channels-last with a free batch stride,
    which torch 2.14.1's CPU batch-norm backward misreads (``gradsel/fisher/layout.py``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(self.fc(self.norm(h)).mean(1))


def conv_tokens(seed: int = 0):
    torch.manual_seed(seed)
    return ConvTokens()
