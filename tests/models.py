"""Small models and batches shared by the tests: built from configs, no downloads."""

from __future__ import annotations

import torch
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


def unet(seed: int = 0):
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8), classes=3)


def unet_batch(n: int = 4, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n, size, size), generator=g)
