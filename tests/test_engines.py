"""Every engine against the batch-of-one loop, in float64, on a matrix of architectures (issue 15).

Each case: every candidate tensor present, max abs difference ≤ 1e-8 × the largest entry of that tensor in
the loop's estimate, with chunks smaller than the batch, with and without per-sample contributions; the
batch and the model's parameters and buffers are left exactly as they were.
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradsel
from gradsel import GradselError
from gradsel.fisher import estimate, rules

from . import models as M

TOL = 1e-8


def _double(batch):
    if isinstance(batch, dict):
        return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    return tuple(x.double() if x.is_floating_point() else x for x in batch)


def _lm_loss(outputs, batch):
    """One sample's causal-LM loss, its own mean over its tokens, in the logits' dtype (float64 here)."""
    logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.movedim(-1, 1), labels, ignore_index=-100)


def _seq2seq_loss(outputs, batch):
    """One sample's sequence-to-sequence loss (the labels are the decoder's targets), in the logits' dtype."""
    return torch.nn.functional.cross_entropy(outputs.logits.movedim(-1, 1), batch["labels"], ignore_index=-100)


def _bert_checkpointed():
    model = M.bert()
    # transformers 5 renamed gradient_checkpointing_enable; it installs an input-embedding requires_grad_ hook
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


CASES = {
    "mlp": (M.mlp, M.mlp_batch),
    "cnn_batchnorm": (M.cnn, M.cnn_batch),
    "embedding_attention_layernorm": (M.attention, M.attention_batch),
    "bert": (M.bert, M.bert_batch),
    "bert_lora": (M.bert_lora, M.bert_batch),
    "smp_unet": (M.unet, lambda: M.unet_batch(n=3)),
    "timm_vit": (M.vit, M.image_batch),
    "torchvision_resnet18_inplace": (M.resnet, lambda: M.image_batch(n=3)),
    "gpt2_tied_lm_head": (M.gpt2, M.gpt2_batch, {"loss": _lm_loss}),
    # the model's own loss: transformers computes token losses in float32 (logits.float()) even for a
    # float64 model, so engines agree with the loop only to float32 rounding there
    "gpt2_own_lm_loss": (M.gpt2, M.gpt2_batch, {"tol": 1e-6}),
    "param_added_to_conv_output": (M.conv_offset, lambda: M.image_batch(size=8)),
    "depthwise_separable": (M.depthwise, lambda: M.image_batch(size=8)),
    "module_called_twice": (M.twice, M.mlp_batch),
    "module_shared_by_two_parents": (M.shared_by_two_parents, lambda: M.image_batch(size=6)),
    "local_output_written_in_place": (M.local_output_written_in_place, lambda: M.image_batch(size=6)),
    "weight_standardised_convs": (M.std_convs, lambda: M.image_batch(size=11)),
    "multihead_attention_masks_and_cross": (M.masked_attention, M.masked_attention_batch),
    "rms_norms": (M.rms_norms, M.seq_batch),
    "batch_first_lstms": (M.lstms, M.seq_batch),  # and GRUs
    "sequence_first_lstms_and_grus": (M.seq_first_rnns, M.seq_batch),
    "packed_sequences": (M.packed_rnns, lambda: M.seq_batch(n=6)),
    "wav2vec2_unused_parameter_beside_the_encoder": (M.wav2vec2, M.wav2vec2_batch),
    "torch_checkpoint": (M.checkpointed, lambda: M.image_batch(size=8)),
    "seq_first_transformer": (M.seq_first, M.seq_batch),
    "gru_and_lstm": (M.recurrent, M.seq_batch),
    "conv_zoo": (M.conv_zoo, lambda: M.image_batch(size=8)),
    "conv_bn_tokens": (M.conv_tokens, lambda: M.image_batch(size=6)),
    "timm_norms": (M.timm_norms, lambda: M.image_batch(size=6)),
    "timm_norm_act_depthwise": (M.norm_act_depthwise, lambda: M.image_batch(size=8)),
    "smp_norms": (M.smp_norms, lambda: M.image_batch(size=6)),
    "output_of_one_repeated_for_the_batch": (M.repeated_position, M.grid_batch),
    "conv_over_each_samples_patches": (M.patch_conv, lambda: M.image_batch(size=8)),
    "same_padding_convs": (M.same_padded, lambda: M.image_batch(size=9)),
    "transposed_convs": (M.transposed_convs, lambda: M.image_batch(size=5)),
    "batchnorm_over_tokens_in_dim_0": (M.flat_token_norm, lambda: M.image_batch(size=4)),
    "output_of_one_flattened_and_indexed": (M.indexed_shared_table, M.mlp_batch),
    "relative_bias_without_sample_dim": (M.relative_bias_net, M.mlp_batch),
    "t5_relative_attention_bias": (M.t5, M.t5_batch),
    "window_attention": (M.windowed, lambda: M.image_batch(size=4)),
    "window_attention_window_major": (lambda: M.windowed(sample_major=False), lambda: M.image_batch(size=4)),
    "bert_hf_gradient_checkpointing": (_bert_checkpointed, M.bert_batch),
    "bert_question_answering": (M.bert_qa, M.bert_qa_batch),  # a dict batch whose labels are answer spans
    "wav2vec2_ctc_speech_recognition": (M.wav2vec2_ctc, M.wav2vec2_ctc_batch),
    "peft_loha_custom_autograd_function": (M.bert_loha, M.bert_batch),
    "video_3d_convs": (M.video_convs, M.video_batch),
    # nn.Embedding subclasses that scale the rows they look up or compute the ids
    "bart_embedding_subclasses": (M.bart, M.bart_batch, {"loss": _seq2seq_loss}),
    "opt_learned_positions": (M.opt, M.gpt2_batch, {"loss": _lm_loss}),
    # masks that the model builds from its 2-D attention mask beyond padding and causality (vmap's 4-D mask would
    # replace them), and an encoder-decoder whose source and target are as long (the decoder's triangle is not the
    # encoder's mask)
    "gemma3_sliding_window": (M.gemma3, M.gpt2_batch, {"loss": _lm_loss}),
    "modernbert_local_attention": (M.modernbert, M.modernbert_batch),
    "mpt_alibi": (M.mpt, M.gpt2_batch, {"loss": _lm_loss}),
    "bart_equal_lengths": (M.bart, lambda: M.bart_batch(t=6, target=6), {"loss": _seq2seq_loss}),
}

ENGINES = [e for e in ("vmap", "hooks", "auto") if e in estimate.ENGINES]

# What vmap cannot run ("auto" falls back with a warning): torch.func's grad does not support the saved-tensor
# hooks that torch.utils.checkpoint installs; HF's gradient_checkpointing_enable() adds a forward hook on the
# input embeddings that calls requires_grad_(), which torch.func transforms refuse.
# torch's RNN, GRU and LSTM kernels write into an output of the unbatched shape (the hooks engine gives an LSTM, a
# GRU or an Elman RNN, batch-first or not, its own batched rule; a projected LSTM the loop).
VMAP_CANNOT = {"torch_checkpoint": "saved tensor hooks", "bert_hf_gradient_checkpointing": "functorch transform",
               "gru_and_lstm": "broadcast shape", "t5_relative_attention_bias": "dynamic shape",
               "batch_first_lstms": "broadcast shape", "sequence_first_lstms_and_grus": "broadcast shape",
               "packed_sequences": "data pointer", "opt_learned_positions": "index out of range",
               "wav2vec2_ctc_speech_recognition": "shape mismatch",  # its padding mask
               "peft_loha_custom_autograd_function": "autograd.Function",
               **dict.fromkeys(["gemma3_sliding_window", "modernbert_local_attention", "mpt_alibi"],
                               "outputs change when its 2-D attention_mask is given as the 4-D")}
# (vmap gets an HF model's 2-D attention mask as the 4-D additive mask it can trace, once the model's outputs are found
# the same with it; OPT counts its position ids from the mask)
# Where the hooks engine's local torch.func gradient cannot run a module without rule, the loop computes it.
# (the LSTM with proj_size of gru_and_lstm; RNNs over PackedSequences: a batched rule for them was exact but slower
# than the loop on this CPU, where torch's own packed forward and backward already cost more than the loop)
HOOKS_LOOP = {"gru_and_lstm": "the batch-of-one loop computes them instead",
              "packed_sequences": "the batch-of-one loop computes them instead"}

_cache: dict[str, tuple] = {}


def _case(name):
    """(model, batch, loop estimate with per-sample contributions), built once per case."""
    if name not in _cache:
        make, make_batch, *opts = CASES[name]
        opts = dict(opts[0]) if opts else {}
        model = make().double()
        batch = _double(make_batch())
        ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False, loss=opts.get("loss"))
        _cache[name] = (model, batch, ref, opts)
    return _cache[name]


def _snapshot(model, batch):
    tensors = batch.values() if isinstance(batch, dict) else batch
    return [t.clone() for t in tensors], {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}


def _assert_untouched(model, batch, snap):
    inputs, state = snap
    tensors = list(batch.values() if isinstance(batch, dict) else batch)
    assert all(torch.equal(a, b) for a, b in zip(tensors, inputs)), "the batch was modified"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} was modified"
    assert all(p.grad is None for p in model.parameters()), "a .grad field was written"


def _assert_matches(est, ref, tol=TOL):
    assert list(est) == list(ref)
    overall = max(ref[n].abs().max().item() for n in ref)
    assert overall > 0  # a case whose Fisher is all zero would test nothing
    for name in ref:
        assert est[name].shape == ref[name].shape and est[name].dtype == torch.float64, name
        # a tensor whose Fisher is zero in exact arithmetic (BERT's key bias: softmax ignores it) holds
        # rounding noise (1e-43): its scale is floored at 1e-10 of the model's largest entry
        largest = max(ref[name].abs().max().item(), 1e-10 * overall)
        diff = (est[name] - ref[name]).abs().max().item()
        assert diff <= tol * largest, (name, diff, largest)


@pytest.mark.parametrize("per_sample", [False, True], ids=["scores", "per_sample"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_matches_loop_float64(engine, case, per_sample):
    model, batch, ref, opts = _case(case)
    tol = opts.get("tol", TOL)
    if engine == "vmap" and case in VMAP_CANNOT:
        with pytest.raises(GradselError, match=rf"vmap cannot run .*{VMAP_CANNOT[case]}.*engine='auto'") as info:
            gradsel.fisher(model, batch, engine="vmap", chunk_size=2, progress=False)
        assert isinstance(info.value.__cause__, (RuntimeError, IndexError))  # torch's own error, kept as the cause
        return
    snap = _snapshot(model, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = gradsel.fisher(model, batch, engine=engine, chunk_size=2, per_sample=per_sample or None,
                             loss=opts.get("loss"), progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    unreached = [m for m in said if "zero Fisher on every sample" in m]
    # the test Unet's encoder_depth=3 leaves layer3 and layer4 out of the forward, wav2vec2 in eval never reads
    # masked_spec_embed, and gradsel says so
    assert bool(unreached) == (case in ("smp_unet", "wav2vec2_unused_parameter_beside_the_encoder",
                                        "wav2vec2_ctc_speech_recognition")), unreached
    said = [m for m in said if m not in unreached]
    if engine == "hooks" and case in HOOKS_LOOP:  # the modules without a rule go to the loop, and it says so
        assert any(HOOKS_LOOP[case] in m for m in said), said
    elif engine != "auto" or case not in VMAP_CANNOT:
        assert not said, said
    assert est.num_samples == ref.num_samples and est.num_samples > 2  # chunks smaller than the batch
    _assert_matches(est, ref, tol)
    if per_sample:
        scale = ref.per_sample.abs().max().item()
        assert (est.per_sample - ref.per_sample).abs().max().item() <= tol * scale
    else:
        assert est.per_sample is None
    _assert_untouched(model, batch, snap)


def test_auto_falls_back_to_the_loop_under_checkpointing_with_a_reason():
    model, batch, ref, _ = _case("torch_checkpoint")
    with pytest.warns(RuntimeWarning, match="saved tensor hooks"):
        est = gradsel.fisher(model, batch, engine="auto", chunk_size=2, progress=False)
    assert est.engine == "loop"
    _assert_matches(est, ref)


def test_vmap_checks_the_4d_mask_again_for_each_sequence_length(monkeypatch):
    # Gemma 3's window of 3 does not show on 3 tokens (vmap runs them with its 4-D mask) but does on 8: that chunk goes
    # to the loop, and the estimate over both is the loop's
    from gradsel.fisher import estimate as est_mod

    model = M.gemma3().double()
    data = [M.gpt2_batch(n=3, t=3), M.gpt2_batch()]
    ref = gradsel.fisher_loop(model, data, loss=_lm_loss, progress=False)
    decided, check = [], est_mod._VmapEngine._vmap_mask

    def spy(self, batch):
        try:
            return check(self, batch)
        finally:
            decided.append(dict(self._mask_holds))

    monkeypatch.setattr(est_mod._VmapEngine, "_vmap_mask", spy)
    with pytest.warns(RuntimeWarning, match="outputs change when its 2-D attention_mask"):
        est = gradsel.fisher(model, data, loss=_lm_loss, progress=False)
    assert decided == [{3: True}, {3: True, 8: False}]
    _assert_matches(est, ref)


def test_tied_weights_are_one_tensor_summed_across_uses():
    # GPT-2's LM head is the token embedding: one candidate, its gradient the sum of both uses per sample
    model, batch, ref, opts = _case("gpt2_tied_lm_head")
    assert "lm_head.weight" not in ref and "transformer.wte.weight" in ref
    untied = M.gpt2().double()
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    split = gradsel.fisher_loop(untied, batch, loss=opts["loss"], progress=False)
    both = split["transformer.wte.weight"] + split["lm_head.weight"]
    assert not torch.allclose(ref["transformer.wte.weight"], both)  # squares of a sum, not a sum of squares


@pytest.mark.parametrize("engine", ["loop", *ENGINES])
def test_a_sparse_embedding_has_the_dense_embeddings_fisher(engine):
    # nn.Embedding(sparse=True) hands autograd a sparse gradient of the rows looked up; the loop densifies it
    def make(sparse):
        torch.manual_seed(2)
        emb = torch.nn.Embedding(12, 5, sparse=sparse, padding_idx=0)
        return torch.nn.Sequential(emb, torch.nn.Flatten(), torch.nn.Linear(20, 3)).double()

    ids = torch.randint(0, 12, (5, 4), generator=torch.Generator().manual_seed(0))
    batch = (ids, torch.tensor([0, 1, 2, 1, 0]))
    ref = gradsel.fisher_loop(make(False), batch, per_sample=True, progress=False)
    est = gradsel.fisher(make(True), batch, engine=engine, chunk_size=2, per_sample=True, progress=False)
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


# -- the hooks engine: what its rules cover, and the cases they must leave to the fallback --------------------

needs_hooks = pytest.mark.skipif("hooks" not in ENGINES, reason="no hooks engine")


def _hooks_fallback(model, batch, **kw):
    """Run engine='hooks'; return the estimate and the candidates that went to its fallback."""
    from gradsel.fisher.engines import HooksEngine

    seen: set[str] = set()
    call = HooksEngine.__call__

    def spy(self, chunk):
        out = call(self, chunk)
        seen.update(self.fallen_back)
        return out

    HooksEngine.__call__ = spy
    try:
        est = gradsel.fisher(model, batch, engine="hooks", chunk_size=kw.pop("chunk_size", 2), progress=False, **kw)
    finally:
        HooksEngine.__call__ = call
    return est, seen


@needs_hooks
@pytest.mark.parametrize("case", ["mlp", "cnn_batchnorm", "bert", "bert_lora", "smp_unet", "torchvision_resnet18_inplace",
                                  "depthwise_separable", "module_called_twice", "torch_checkpoint", "timm_vit",
                                  "param_added_to_conv_output", "gpt2_tied_lm_head", "gpt2_own_lm_loss",
                                  "embedding_attention_layernorm", "transposed_convs",
                                  "batchnorm_over_tokens_in_dim_0", "bert_hf_gradient_checkpointing",
                                  "module_shared_by_two_parents", "t5_relative_attention_bias",
                                  "local_output_written_in_place", "weight_standardised_convs",
                                  "multihead_attention_masks_and_cross", "rms_norms", "batch_first_lstms",
                                  "sequence_first_lstms_and_grus", "seq_first_transformer",
                                  "bart_embedding_subclasses", "opt_learned_positions", "bert_question_answering",
                                  "wav2vec2_ctc_speech_recognition", "peft_loha_custom_autograd_function",
                                  "video_3d_convs"])
def test_hooks_rules_cover_every_candidate(case):
    # no fallback pass at all: position embeddings (1, T, D) expanded, unused encoder stages zero, in-place
    # ReLU/residuals, depthwise and 1-D convs, transposed convs, a layer called twice, checkpointed blocks
    model, batch, ref, opts = _case(case)
    est, fell = _hooks_fallback(model, batch, loss=opts.get("loss"))
    assert fell == set()
    _assert_matches(est, ref, opts.get("tol", TOL))


@needs_hooks
@pytest.mark.parametrize("case", ["mlp", "cnn_batchnorm", "bert", "module_called_twice", "depthwise_separable",
                                  "gpt2_tied_lm_head", "torch_checkpoint", "transposed_convs",
                                  "batchnorm_over_tokens_in_dim_0", "weight_standardised_convs",
                                  "multihead_attention_masks_and_cross", "rms_norms", "batch_first_lstms"])
def test_hooks_contributions_over_masks_match_the_loop(case):
    # every rule's masked per-sample path: (δ²)ᵀ(a²), token blocks, conv, embedding rows, norms, biases
    model, batch, _, opts = _case(case)
    gen = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in model.named_parameters()}
    est = gradsel.fisher(model, batch, engine="hooks", per_sample=mask, chunk_size=2, loss=opts.get("loss"),
                         progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, loss=opts.get("loss"), progress=False)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()
    alone = gradsel.fisher(model, batch, engine="hooks", per_sample=mask, scores=False, chunk_size=3,
                           loss=opts.get("loss"), progress=False)
    assert (alone.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@needs_hooks
@pytest.mark.parametrize("case", ["bert", "timm_vit", "gpt2_tied_lm_head"])
def test_hooks_token_linears_one_sample_per_block(case, monkeypatch):
    # BLOCK_BYTES below one sample's gradient: every token-axis Linear forms one sample at a time in the scratch
    # buffer, squared before the next overwrites it (the tied sum one sample at a time in fresh blocks); the
    # Fisher and the masked contributions stay exact
    from gradsel.fisher.engines import hooks

    monkeypatch.setattr(hooks, "BLOCK_BYTES", 1)
    model, batch, _, opts = _case(case)
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) > 0.5
            for n, p in model.named_parameters()}
    est, fell = _hooks_fallback(model, batch, per_sample=mask, loss=opts.get("loss"))
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, loss=opts.get("loss"), progress=False)
    assert fell == set()
    _assert_matches(est, ref, opts.get("tol", TOL))
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()
    plain, _ = _hooks_fallback(model, batch, loss=opts.get("loss"))  # the unmasked path (one pass per sample)
    _assert_matches(plain, ref, opts.get("tol", TOL))


def test_weight_standardised_convs_have_a_rule_for_weight_bias_and_gain():
    # not a module-local torch.func gradient (exact too, 2-3x slower on the NF-nets): the conv rule's per-sample
    # gradients taken back through the standardisation (the matrix case above checks them against the loop)
    from gradsel.fisher.engines import hooks

    model = M.std_convs()
    layers = hooks.find_layers(model, [n for n, _ in model.named_parameters()])
    std = [n for n, m in model.named_modules() if type(m).__module__ == "timm.layers.std_conv"]
    assert len(std) == 6 and all(layers[n].rule is hooks._std_conv for n in std)
    assert layers["grouped"].attrs == {"weight": "grouped.weight", "bias": "grouped.bias", "gain": "grouped.gain"}
    assert layers["stem"].attrs == {"weight": "stem.weight", "bias": "stem.bias"}


def test_weight_standardised_gain_from_the_weight_pass_or_a_convolution(monkeypatch):
    # with the weights, each gain's gradients are the sums the weight's pass formed; alone, one convolution
    model, batch, ref, _ = _case("weight_standardised_convs")
    gains = [n for n in ref if n.endswith(".gain")]
    read, real = [], rules.GainGrads._grads
    monkeypatch.setattr(rules.GainGrads, "_grads",
                        lambda self, dtype: read.append(self.weight is not None and self.weight.dots is not None)
                        or real(self, dtype))
    est = gradsel.fisher(model, batch, engine="hooks", chunk_size=2, progress=False)
    assert len(read) == 3 * len(gains) and all(read)  # three chunks
    _assert_matches(est, ref, TOL)
    read.clear()
    alone = gradsel.fisher(model, batch, engine="hooks", params=gains, chunk_size=2, progress=False)
    assert len(read) == 3 * len(gains) and not any(read)
    _assert_matches(alone, {k: ref[k] for k in gains}, TOL)


@pytest.mark.parametrize("case, kind", [("embedding_attention_layernorm", torch.nn.MultiheadAttention),
                                        ("multihead_attention_masks_and_cross", torch.nn.MultiheadAttention),
                                        ("batch_first_lstms", (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)),
                                        ("sequence_first_lstms_and_grus",
                                         (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN))])
def test_attention_and_lstms_take_a_batched_recomputation(case, kind, monkeypatch):
    # every nn.MultiheadAttention call (masks, cross-attention, a second call, the one inside torch's
    # TransformerEncoderLayer) and every LSTM, GRU and RNN, batch-first or sequence-first (both directions, given states,
    # final states read), gets its gradients from one batched run, none from a torch.func pass per sample or the loop
    from gradsel.fisher.engines import hooks

    taken, real = [], hooks._batched_local
    monkeypatch.setattr(hooks, "_batched_local", lambda *a: taken.append(real(*a)) or taken[-1])
    monkeypatch.setattr(hooks, "_module_grads", lambda *a: pytest.fail("a torch.func pass ran"))
    model, batch, ref, opts = _case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop taking over would say so
        est = gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
    modules = sum(isinstance(m, kind) for m in model.modules())
    chunks = -(-len(batch[0]) // 3)
    assert len(taken) == chunks * modules and all(t is not None for t in taken)
    _assert_matches(est, ref, TOL)


class _Lookup(torch.nn.Embedding):
    """nn.Embedding subclasses as HF writes them: scaled rows (BART's tokens), computed ids (learned positions), two
    lookups in one call; and two the rule must not read: another padding row than the module's, the weight read
    again beside its lookup."""

    def __init__(self, kind: str, rows: int = 12, dim: int = 5):
        super().__init__(rows, dim, padding_idx=0)
        self.kind = kind

    def forward(self, ids):
        if self.kind == "scaled":
            return super().forward(ids) * 2.5
        if self.kind == "positions":
            return super().forward(torch.arange(ids.shape[1]).expand(ids.shape[0], -1) + 2)
        if self.kind == "twice":
            return super().forward(ids) + super().forward(ids.flip(1))
        if self.kind == "other_padding":
            return torch.nn.functional.embedding(ids, self.weight, padding_idx=3)
        return super().forward(ids) / self.weight.norm()  # "weight_read_again"


class _Lookups(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.tokens, self.positions = _Lookup(kind), _Lookup("positions")
        self.head = torch.nn.Linear(5, 3)

    def forward(self, ids):
        return self.head((self.tokens(ids) + self.positions(ids)).tanh().mean(1))


@pytest.mark.parametrize("kind, ruled", [("scaled", True), ("twice", True), ("other_padding", False),
                                         ("weight_read_again", False)])
def test_hooks_reads_embedding_subclasses_at_their_lookups(kind, ruled, monkeypatch):
    # the rule reads each F.embedding of the module's weight inside its forward; a lookup with other options than the
    # module's, or a weight also read otherwise, takes the fallback; the positions' subclass always has the rule
    from gradsel.fisher.engines import hooks

    monkeypatch.setattr(hooks, "_module_grads", lambda *a: pytest.fail("a torch.func pass ran"))
    model = _Lookups(kind).double()
    batch = (torch.randint(0, 12, (5, 7), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 1, 0]))
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    est, fell = _hooks_fallback(model, batch, per_sample=True, chunk_size=3)
    assert fell == (set() if ruled else {"tokens.weight"})
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


class _InnerPositions(torch.nn.Module):
    """timm TNT's layout: ``pixel_pos`` added to each sample's patches (several rows of dim 0 per sample, so a copy
    per sample does not fit), ``cls_token`` concatenated to each sample's tokens (a copy per sample fits)."""

    def __init__(self, c: int = 4, patches: int = 3, pixels: int = 2):
        super().__init__()
        self.shape = (patches, pixels, c)
        self.pixel_pos = torch.nn.Parameter(torch.randn(1, pixels, c) * 0.5)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, c) * 0.5)
        self.inner, self.head = torch.nn.Linear(c, c), torch.nn.Linear(c, 3)

    def forward(self, x):
        (patches, pixels, c), n = self.shape, x.shape[0]
        rows = x.reshape(n * patches, pixels, c) + self.pixel_pos
        h = self.inner(rows).tanh().mean(1).reshape(n, patches, c)
        return self.head(torch.cat([self.cls_token.expand(n, -1, -1), h], 1).tanh().mean(1))


def test_hooks_keeps_the_copies_per_sample_that_fit_when_another_fails():
    # the copies of cls_token and pixel_pos failed together (pixel_pos's rows are not the samples): cls_token keeps its
    # copy, pixel_pos is read as an add into each sample's rows; nothing is left to the fallback
    model = _InnerPositions().double()
    batch = (torch.randn(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
             torch.tensor([0, 1, 2, 1, 0, 2]))
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    est, fell = _hooks_fallback(model, batch, per_sample=True, chunk_size=3)  # (not 2: the 2 pixels would look like
    assert fell == set()  # samples on dim 1)
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@needs_hooks
@pytest.mark.parametrize("case", ["xcit_positions", "peft_prompt_tuning", "peft_p_tuning"])
def test_hooks_repeats_each_copy_of_an_output_repeated_for_the_batch(case):
    # XCiT repeats one grid's positional encoding for the batch, peft one sample's prompts (p-tuning: the prompt
    # embedding through an MLP, then repeated): a repeat of the copies per sample keeps one copy a row, so the rules
    # read them (they had gone to the fallback: the copies repeated n times made n² rows)
    model, batch = {"xcit_positions": (M.repeated_position, lambda: _double(M.grid_batch())),
                    "peft_prompt_tuning": (M.bert_prompt, lambda: M.bert_batch(n=4)),
                    "peft_p_tuning": (lambda: M.bert_prompt(encoder=True), lambda: M.bert_batch(n=4))}[case]
    model, batch = model().double().eval(), batch()
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = gradsel.fisher_loop(model, batch, params=params, per_sample=True, progress=False)
    est, fell = _hooks_fallback(model, batch, params=params, per_sample=True, chunk_size=4)
    assert fell == set()
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


class _IndexedTables(torch.nn.Module):
    """Four of HF Swinv2's position-bias MLPs in a row (torchvision's Swin V2 has one a block): each MLP's copies per
    sample fail their own check, and a fifth batch-shared output (a plain position table) takes its copies."""

    def __init__(self):
        super().__init__()
        self.tables = torch.nn.ModuleList(M.IndexedSharedTable() for _ in range(4))
        self.pos = torch.nn.Linear(2, 6)
        self.register_buffer("grid", torch.randn(1, 2))

    def forward(self, x):
        h = x + self.pos(self.grid)
        return sum(table(h) for table in self.tables)


def test_hooks_refuses_the_copies_that_fail_their_own_check_in_one_pass(monkeypatch):
    # each failing copy is named by its own check: one more pass, not one per copy (torchvision's Swin V2 took
    # 13.5 s for its first call, whose later calls take 0.4 s; now 2.1 s)
    from gradsel.fisher.engines import HooksEngine

    passes, per_layer = [], HooksEngine._per_layer
    monkeypatch.setattr(HooksEngine, "_per_layer", lambda self, *a: passes.append(1) or per_layer(self, *a))
    torch.manual_seed(0)
    model = _IndexedTables().double()
    batch = _double(M.mlp_batch(n=4))
    est, fell = _hooks_fallback(model, batch, chunk_size=4)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    # with the five copies; without the four that failed; with the MLPs in their tables' local gradients (each
    # copy tried alone in a pass of its own took 9)
    assert len(passes) == 3
    assert fell == set()
    decided = importlib.import_module("gradsel.fisher.engines.hooks")._DECIDED[model][1]
    assert decided["_expand_ok"] == {"pos"} and decided["_expand_off"] == {f"tables.{i}.mlp" for i in range(4)}


class _OwnKeys(torch.nn.Module):
    """A model called on a dict batch that computes its loss from a key of its own (``target``), not ``labels``."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x, target):
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, target), "logits": logits}


@needs_hooks
def test_hooks_takes_the_fallback_for_a_dict_batch_whose_loss_comes_from_other_keys():
    # the model returns its loss, but no per-sample form of it is known: the whole-model fallback, with a warning
    # that names loss= (this had raised "the model returned no loss", while vmap and the loop ran it)
    torch.manual_seed(0)
    model = _OwnKeys().double()
    x, y = _double(M.mlp_batch(n=5))
    batch = {"x": x, "target": y}
    with pytest.warns(RuntimeWarning, match="without 'labels' .keys: x, target.*Pass loss="):
        est = gradsel.fisher(model, batch, engine="hooks", chunk_size=5, progress=False)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    with pytest.raises(GradselError, match="returned no loss for a dict batch"):  # no loss at all: say so
        gradsel.fisher(M.mlp().double(), {"x": x}, engine="hooks", progress=False, forward=lambda m, b: m(b["x"]))


def test_a_local_candidate_the_graph_never_reaches_is_zero_without_a_re_run(monkeypatch):
    # wav2vec2's body holds masked_spec_embed (unused in eval) above the encoder: a per-sample re-run of that
    # module would be a re-run of the whole model; only the weight-normed positional conv takes torch.func
    from gradsel.fisher.engines import hooks

    ran, real = [], hooks._module_grads
    monkeypatch.setattr(hooks, "_module_grads", lambda module, *a: ran.append(type(module).__name__) or real(module, *a))
    model, batch, ref, _ = _case("wav2vec2_unused_parameter_beside_the_encoder")
    est = gradsel.fisher(model, batch, engine="hooks", chunk_size=2, progress=False)
    assert "Wav2Vec2Model" not in ran and ran  # the positional conv's local gradient did run
    assert not est["wav2vec2.masked_spec_embed"].any()
    _assert_matches(est, ref, TOL)


def test_rms_norms_have_rules():
    from gradsel.fisher.engines import hooks

    model = M.rms_norms()
    layers = hooks.find_layers(model, [n for n, _ in model.named_parameters()])
    assert all(layers[n].rule is hooks._rmsnorm for n in ("norm", "norm2d", "timm"))


class _WeightReadTwice(torch.nn.Module):
    """A Linear whose weight is also read directly (not through the module), and a layer that never runs."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 5)
        self.b = torch.nn.Linear(5, 3)
        self.unused = torch.nn.Linear(5, 5)

    def forward(self, x):
        h = self.a(x)
        h = h + 0.1 * torch.nn.functional.linear(torch.tanh(h), self.a.weight)  # a.weight used twice
        return self.b(torch.tanh(h))


@needs_hooks
def test_hooks_is_exact_when_a_weight_is_used_outside_its_layer_or_a_layer_never_runs():
    torch.manual_seed(0)
    model = _WeightReadTwice().double()
    batch = _double(M.mlp_batch(n=6))
    batch = (batch[0][:, :5].contiguous(), batch[1])
    snap = _snapshot(model, batch)
    est, fell = _hooks_fallback(model, batch, per_sample=True)
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    assert fell == {"a.weight"}  # the rule would miss the direct use: vmap computes it
    assert est["unused.weight"].abs().max() == 0
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()
    _assert_untouched(model, batch, snap)


class _GainFirst(torch.nn.Module):
    """A parameter without rule before every rule layer (as BART's scaled token embedding): the layers' inputs
    require grad through it alone, so no root starts at them."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.a = torch.nn.Linear(5, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x * self.gain))))


@needs_hooks
def test_hooks_reaches_layers_downstream_of_a_parameter_without_rule():
    torch.manual_seed(0)
    model = _GainFirst().double()
    batch = _double(M.mlp_batch(n=6))
    batch = (batch[0][:, :5].contiguous(), batch[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est, fell = _hooks_fallback(model, batch, per_sample=True)
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    assert fell == {"gain"}  # the layers after it keep their rules (they all went to the fallback before)
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


class _SharedParamsMisused(torch.nn.Module):
    """Parameters of shape (1, ...) used in ways that a copy per sample would change: indexed ([0]) and summed
    over dim 0; and one broadcast as usual."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        self.first = torch.nn.Parameter(torch.randn(1, 3))
        self.summed = torch.nn.Parameter(torch.randn(1, 3))
        self.broadcast = torch.nn.Parameter(torch.randn(1, 3))

    def forward(self, x):
        return self.lin(x) + self.first[0] + self.summed.sum(0) + self.broadcast


@needs_hooks
@pytest.mark.parametrize("which", ["first", "summed"])
def test_hooks_checks_the_copy_per_sample_of_shared_parameters(which):
    # [0] gives the loss the model gives but puts every sample's gradient on copy 0: the loop check finds it;
    # .sum(0) changes the loss: the loss check finds it; either way the fallback computes them, exactly
    torch.manual_seed(0)
    model = _SharedParamsMisused().double()
    x, y = _double(M.mlp_batch(n=6))
    batch = (x[:, :5].contiguous(), y)
    est, fell = _hooks_fallback(model, batch, params=["lin.weight", which, "broadcast"], chunk_size=3)
    ref = gradsel.fisher_loop(model, batch, params=["lin.weight", which, "broadcast"], progress=False)
    assert which in fell
    _assert_matches(est, ref)


@needs_hooks
@pytest.mark.parametrize("case", ["mlp", "cnn_batchnorm", "timm_vit", "module_called_twice", "depthwise_separable",
                                  "timm_norm_act_depthwise"])
def test_hooks_runs_under_autocast_and_sums_in_float32(case):
    # inside the user's torch.autocast(bfloat16): the layers' inputs (float32) and output gradients (bfloat16)
    # are squared in float32; the estimate is the float32 one up to bfloat16 rounding, as the loop's is
    make, make_batch, *_ = CASES[case]
    model, batch = make(), make_batch()
    ref = gradsel.fisher_loop(model, batch, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        est, fell = _hooks_fallback(model, batch, chunk_size=3)
        loop16 = gradsel.fisher_loop(model, batch, progress=False)
    assert fell == set()  # a weight cast once and used by two calls still counts as two uses
    overall = max(r.abs().max().item() for r in ref.values())
    for name in ref:
        assert est[name].dtype == torch.float32
        scale = max(ref[name].abs().max().item(), 1e-3 * overall)
        assert (est[name] - ref[name]).abs().max().item() <= 0.05 * scale, name
        # no worse than the loop under the same autocast (twice as far at most)
        assert (est[name] - ref[name]).abs().max() <= 2 * (loop16[name] - ref[name]).abs().max() + 1e-3 * scale


@needs_hooks
@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_hooks_writes_the_hf_models_own_loss_per_sample(problem):
    # the per-sample form of the model's loss is found by comparing with the model's own on one sample
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    labels = 1 if problem == "regression" else 3
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=labels, problem_type=problem, attn_implementation="eager")).double()
    batch = M.bert_batch(n=5)
    g = torch.Generator().manual_seed(2)
    batch["labels"] = (torch.randn(5, generator=g).double() if problem == "regression"
                       else (torch.rand(5, 3, generator=g) > 0.5).double())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no whole-model fallback
        est = gradsel.fisher(model, batch, engine="hooks", chunk_size=2, per_sample=True, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@needs_hooks
def test_hooks_with_custom_forward_and_loss_and_an_unknown_model_loss():
    model = M.mlp().double()
    x, y = _double(M.mlp_batch())
    batch = {"features": x, "target": y}
    est = gradsel.fisher(model, batch, engine="hooks", forward=lambda m, b: m(b["features"]),
                         loss=lambda out, b: torch.nn.functional.cross_entropy(out, b["target"]), chunk_size=5,
                         progress=False)
    ref = gradsel.fisher_loop(model, (x, y), progress=False)
    _assert_matches(est, ref)

    class Scaled(torch.nn.Module):  # an HF-style output whose loss is no known per-sample form
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, features, labels):
            logits = self.lin(features)
            return {"logits": logits, "loss": 3.0 * torch.nn.functional.cross_entropy(logits, labels) + 1.0}

    torch.manual_seed(0)
    odd = Scaled().double()
    hf = {"features": x, "labels": y}
    with pytest.warns(RuntimeWarning, match="matches none of the per-sample forms"):
        est = gradsel.fisher(odd, hf, engine="hooks", chunk_size=5, progress=False)
    _assert_matches(est, gradsel.fisher_loop(odd, hf, progress=False))


class _ScaleReadOutside(torch.nn.Module):
    """A layer-scale module (no rule) whose parameter the parent also reads directly."""

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x * self.gamma

    def __init__(self):
        super().__init__()
        self.scale = self.Scale()
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.scale(x)) + self.scale.gamma)


@needs_hooks
def test_hooks_local_module_gradient_is_checked_against_the_loop():
    # the local torch.func gradient of Scale misses the parent's direct read: found once, left to vmap
    torch.manual_seed(0)
    model = _ScaleReadOutside().double()
    batch = _double(M.mlp_batch(n=6))
    est, fell = _hooks_fallback(model, batch, per_sample=True, chunk_size=3)
    ref = gradsel.fisher_loop(model, batch, per_sample=True, progress=False)
    assert fell == {"scale.gamma"}
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@needs_hooks
@pytest.mark.parametrize("lengths", [(7,), (5,), (7, 5)], ids=["tokens_first", "as_many_tokens", "then_as_many"])
def test_hooks_never_reads_tokens_as_samples(lengths):
    # batch_first=False: inside the encoder layer dim 0 holds the tokens, dim 1 the samples. Its Linears and
    # LayerNorms are read transposed and its attention from dim 1; with as many tokens as samples their shapes look
    # batch-first, and the rules would read tokens as samples (10% off, silently, before the check), so the check
    # runs again in that layout (a layer checked on dim 1 once is not trusted on dim 0) and sends them to the fallback
    model = M.seq_first(seed=2).double()
    batches = [_double(M.seq_batch(n=5, t=t, seed=t)) for t in lengths]
    est, fell = _hooks_fallback(model, batches, chunk_size=5)
    _assert_matches(est, gradsel.fisher_loop(model, batches, progress=False))
    token_wise = {n for n, _ in model.named_parameters() if n.startswith(("enc.linear", "enc.norm"))}
    assert fell == (token_wise if 5 in lengths else set())  # the attention and the layers around it keep their rules


@needs_hooks
def test_hooks_gives_a_table_without_sample_dim_to_its_parent():
    # HF Swin's relative-position bias module returns one (heads, N, N) bias for every sample: its own local
    # gradient has no sample to split, so its parent (the attention, which sees the samples) takes the table
    # into its local gradient, instead of the whole-model fallback; so does the parent of one that never runs
    # while the parent reads its table (timm MaxViT: get_bias() into SDPA); the next call starts from there
    torch.manual_seed(0)
    model = M.relative_bias_net().double()
    batch = _double(M.mlp_batch(n=5))
    forwards = []
    model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    est, fell = _hooks_fallback(model, batch, chunk_size=5)
    assert fell == set()
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    batched = forwards.count(5)
    forwards.clear()
    again, fell = _hooks_fallback(model, batch, chunk_size=5)
    assert fell == set() and forwards.count(5) == 1 < batched  # the first call re-ran its chunk once lifted
    _assert_matches(again, est, tol=1e-12)


@pytest.mark.parametrize("t", [10, 8], ids=["no_sample_dim", "batch_sized_dim"])
def test_hooks_gives_a_rule_layer_without_sample_dim_to_its_parent(t):
    # T5's relative-attention embedding looks up one (q, k) bucket table for every sample and its attention
    # returns the bias (1, heads, q, k) to every later layer: the embedding's rule has no sample to split, so the
    # attention takes the table into its local gradient, with the returned bias expanded per sample (each
    # sample's gradient of it, from every layer); the softmax it also returns, and reads itself, gets only the
    # gradient from outside. With t = 8, the table's dim 0 is a multiple of the chunk of 4, so it is read as
    # windows of each sample until the batch-first check finds that it holds no sample
    model = M.t5().double()
    batch = _double(M.t5_batch(n=8, t=t))
    ref = gradsel.fisher_loop(model, batch, progress=False)
    est, fell = _hooks_fallback(model, batch, chunk_size=4)
    assert len({n for n in ref if "relative_attention_bias" in n}) == 2 and fell == set()
    _assert_matches(est, ref)
    again, fell = _hooks_fallback(model, batch, chunk_size=4)
    assert fell == set()
    _assert_matches(again, ref)


def test_hooks_runs_hf_models_without_their_key_value_cache():
    # T5's decoder builds a key/value cache by default; the local gradient of its first self-attention (which
    # holds the relative-attention table) would run that attention again on the cache the batched forward filled.
    # Estimation passes use_cache=False, so nothing falls back; the model's own loss is float32 (HF upcasts the
    # logits), hence the tolerance
    model = M.t5_seq2seq().double()
    batch = _double(M.t5_seq2seq_batch(n=6))
    ref = gradsel.fisher_loop(model, batch, progress=False)
    est, fell = _hooks_fallback(model, batch, chunk_size=3)
    assert fell == set()
    _assert_matches(est, ref, tol=1e-6)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    gradsel.fisher(model, {**batch, "use_cache": True}, engine="loop", progress=False)  # the batch's own word
    assert seen and set(seen) == {True}
    seen.clear()
    gradsel.fisher(model, batch, engine="loop", progress=False)
    assert seen and set(seen) == {False}


def test_sample_check_tells_rounding_from_another_sample():
    # the batch-of-one check of a layer's inputs passes float32 rounding against the layer's scale (deep in
    # MobileNetV2 it sent 15 tensors to the fallback), and still fails another sample's or token's values
    from gradsel.fisher.engines.hooks import _same_sample

    g = torch.Generator().manual_seed(0)
    batched = torch.randn(4, 8, 6, 6, generator=g).clamp(-6, 6)
    drift = 20 * torch.finfo(torch.float32).eps * 6 * torch.randn(1, 8, 6, 6, generator=g)
    assert _same_sample([batched[1:2] + drift], [batched], 1)
    assert not _same_sample([batched[2:3] + drift], [batched], 1)  # the next sample's input
    assert not _same_sample([batched[1:2].roll(1, 1)], [batched], 1)  # its channels shifted
    assert not _same_sample([batched[1:2] + 2e-2 * 6], [batched], 1)  # 2% of the scale is not rounding
    double = batched.double()
    assert not _same_sample([double[1:2] + drift.double()], [double], 1)  # float64 rounding is far smaller


@needs_hooks
@pytest.mark.parametrize("sample_major", [True, False], ids=["sample_major", "window_major"])
def test_hooks_reads_windows_as_tokens_of_their_sample(sample_major):
    # Swin's window partition puts each sample's windows one after another on dim 0: the token-wise rules
    # and the module-local gradient (the relative bias) read them as that sample's; laid out window-major,
    # the samples interleave, the checks see it and everything in the windows goes to the fallback
    model = M.windowed(seed=3, sample_major=sample_major).double()
    batch = _double(M.image_batch(n=5, size=4, seed=4))
    est, fell = _hooks_fallback(model, batch, chunk_size=5)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    in_windows = {n for n, _ in model.named_parameters() if n.startswith(("attn.", "shifted."))}
    assert fell == (set() if sample_major else in_windows)


@needs_hooks
def test_hooks_reads_windows_of_as_many_tokens_as_samples_by_their_rules(monkeypatch):
    # four windows of 4 tokens a sample and 4 samples: the windows' (16, 4, 8) has the chunk's size on dim 1, so
    # it is first read as sequence-first; that check fails, and the layers are read again as windows, by their
    # rules (they had gone to a torch.func gradient of their parent); a last chunk of 3 reads them as windows too
    from gradsel.fisher.engines import HooksEngine

    lifted, lift = [], HooksEngine._lift
    monkeypatch.setattr(HooksEngine, "_lift", lambda self, name: (lifted.append(name), lift(self, name))[1])
    model = M.windowed(seed=3).double()
    batch = _double(M.image_batch(n=7, size=4, seed=4))
    est, fell = _hooks_fallback(model, batch, chunk_size=4)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    assert fell == set() and lifted == []


class _OwnNorm(torch.nn.GroupNorm):
    """A GroupNorm subclass: no rule (a subclass may compute something else), so the module-local gradient."""


class _PoolMixer(torch.nn.Module):
    """PoolFormer's token mixer ``pool(h) - h`` after a norm: the pool of a constant is that constant, so the
    norm's bias has a gradient of zero by structure (rounding noise on both sides of the local check)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = _OwnNorm(1, 4)
        self.head = torch.nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = self.norm(self.conv(x))
        h = torch.nn.functional.avg_pool2d(h, 3, 1, 1, count_include_pad=False) - h
        return self.head(torch.tanh(h).flatten(1))


def test_timm_norms_have_rules():
    # timm's norm subclasses compute what torch's do (LayerNorm2d over the channels): rules, not a per-sample
    # torch.func of the module (which made ConvNeXt-atto's hooks estimate twice as slow)
    from gradsel.fisher.engines.hooks import find_layers

    for model in (M.timm_norms(), M.smp_norms()):
        names = [n for n, _ in model.named_parameters()]
        ruled = {p for layer in find_layers(model, names).values() for p in layer.attrs.values()}
        assert ruled == set(names)


def test_3d_convs_have_rules():
    # Conv3d (torchvision's subclasses too) and ConvTranspose3d: rules, not a per-sample torch.func of each module
    # (torchvision's R3D-18 at 8×64², batch 8: hooks from 2.42x the floor to 1.30x, results/fisher_zoo_video*.md)
    from gradsel.fisher.engines.hooks import find_layers

    model = M.video_convs()
    names = [n for n, _ in model.named_parameters()]
    ruled = {p for layer in find_layers(model, names).values() for p in layer.attrs.values()}
    assert ruled == set(names)


def test_timm_norm_act_layers_string_paddings_and_transposed_convs_have_rules():
    # BatchNormAct2d and its kin are a norm, then an elementwise drop and act: the norm's rule on the gradient
    # passed back through them (a per-sample torch.func of each of MobileNetV2's 52 had made its estimate 2.5x
    # the floor); a tail that is not known to be elementwise keeps the module-local gradient
    from timm.layers import DropBlock2d
    from gradsel.fisher.engines.hooks import find_layers

    model = M.norm_act_depthwise()
    names = [n for n, _ in model.named_parameters()]
    ruled = {p for layer in find_layers(model, names).values() for p in layer.attrs.values()}
    assert ruled == set(names) - {"same_even.weight", "same_even.bias"}  # torch pads an even "same" kernel unevenly
    for other in (M.same_padded(), M.transposed_convs()):  # convolutions that pad their input themselves; transposed
        assert {p for layer in find_layers(other, [n for n, _ in other.named_parameters()]).values()
                for p in layer.attrs.values()} == {n for n, _ in other.named_parameters()}
    model.bn.drop = DropBlock2d(0.1)
    model.gn.act = torch.nn.PReLU()
    names = [n for n, _ in model.named_parameters()]
    ruled = {p for layer in find_layers(model, names).values() for p in layer.attrs.values()}
    assert ruled == set(names) - {"bn.weight", "bn.bias", "gn.weight", "gn.bias", "gn.act.weight", "same_even.weight",
                                  "same_even.bias"}


@needs_hooks
def test_hooks_keeps_a_local_gradient_that_is_zero_by_structure():
    torch.manual_seed(0)
    model = _PoolMixer().double()
    batch = _double(M.image_batch(n=4, size=6))
    est, fell = _hooks_fallback(model, batch, chunk_size=4)
    ref = gradsel.fisher_loop(model, batch, progress=False)
    _assert_matches(est, ref)
    assert float(ref["norm.bias"].max()) < 1e-25 * float(ref["norm.weight"].max())  # zero but for rounding
    assert fell == set()  # noise against noise is not a mismatch: the bias stays off the whole-model fallback


class _ScaleBlock(torch.nn.Module):
    """Parameters a block multiplies or adds into its activations itself, with no module of their own."""

    def __init__(self, tokens_first: bool = False):
        super().__init__()
        self.tokens_first = tokens_first
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.randn(4))  # x.mul(gamma.reshape(1, -1, 1, 1)): timm ConvNeXt
        self.scale = torch.nn.Parameter(torch.randn(4))  # scale * x channels-last: HF ConvNext
        self.shift = torch.nn.Parameter(torch.randn(4))  # x + shift[:, None, None], twice
        self.mix = torch.nn.Parameter(torch.randn(4, 4))  # in a matmul: not elementwise
        self.inplace = torch.nn.Parameter(torch.randn(4))  # x.mul_(...): not elementwise

    def forward(self, x):
        h = self.conv(x)
        if self.tokens_first:  # (pixels, batch, channels): dim 0 is the batch's size only by chance
            t = h.flatten(2).permute(2, 0, 1)
            return (t * self.gamma).permute(1, 2, 0).reshape(h.shape)
        h = torch.tanh(h.mul(self.gamma.reshape(1, -1, 1, 1)))
        h = (self.scale * h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = torch.tanh(h + self.shift[:, None, None]) + self.shift[:, None, None]
        h = torch.einsum("nchw,cd->ndhw", h, self.mix)
        return torch.tanh(h).clone().mul_(self.inplace[:, None, None])


class _Scaled(torch.nn.Module):
    def __init__(self, size: int, tokens_first: bool = False):
        super().__init__()
        self.block = _ScaleBlock(tokens_first)
        self.head = torch.nn.Linear(4 * size * size, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)).flatten(1))


@needs_hooks
@pytest.mark.parametrize("tokens_first", [False, True], ids=["batch_first", "tokens_first"])
def test_hooks_reads_layer_scales_from_the_batched_forward(tokens_first):
    # a layer scale held by its block (ConvNeXt's gamma) would take the block's module-local gradient, a
    # per-sample re-run of the block; multiplied or added into a batched tensor, its per-sample gradient is
    # read from the batched forward instead. Anything else (a matmul, an in-place mul, a tensor whose dim 0
    # only happens to have the batch's size) keeps the module-local path or the fallback, exactly.
    from gradsel.fisher.engines import hooks

    torch.manual_seed(0)
    size = 2 if tokens_first else 6  # tokens first: 2×2 pixels for 4 samples
    model = _Scaled(size, tokens_first).double()
    batch = _double(M.image_batch(n=8, size=size))
    # two chunks: a layer scale that fails its check on the first takes the module-local path on the second,
    # which is checked in its turn (window_attention_window_major in the matrix shows one that would fail it)
    est, fell = _hooks_fallback(model, batch, chunk_size=4)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    decided = hooks._DECIDED[model][1]
    if tokens_first:  # the check against the loop sees the pixels read as samples
        assert "block.gamma" in decided["_not_elementwise"] and "block.gamma" in fell
    else:
        assert decided["_not_elementwise"] == {"block.mix", "block.inplace"} and fell == set()


@needs_hooks
def test_hooks_reads_hf_layer_scales_under_a_dict_batch():
    # a dict batch with labels checks the model's loss form in a no-grad forward of one sample, inside the
    # watch: that forward's uses must not count (HF ConvNext's layer_scale_parameter went to the local path)
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from gradsel.fisher.engines import hooks

    torch.manual_seed(0)
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
                            layer_scale_init_value=0.5)
    model = ConvNextForImageClassification(config).double()
    x, y = _double(M.image_batch(n=4, size=32))
    batch = {"pixel_values": x, "labels": y}
    est, fell = _hooks_fallback(model, batch, chunk_size=2)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    scales = {n for n, _ in model.named_parameters() if n.endswith("layer_scale_parameter")}
    assert len(scales) == 2 and fell == set()
    assert not scales & hooks._DECIDED[model][1]["_not_elementwise"]
    # its LayerNorm (channels last, and channels first in the stem and downsampling) has a rule
    norms = {f"{m}.{a}" for m, mod in model.named_modules() if type(mod).__name__ == "ConvNextLayerNorm"
             for a in ("weight", "bias")}
    names = [n for n, _ in model.named_parameters()]
    ruled = {p for layer in hooks.find_layers(model, names).values() for p in layer.attrs.values()}
    assert len(norms) == 8 and norms <= ruled


@needs_hooks
def test_hooks_finds_a_model_that_mixes_samples_and_falls_back():
    # BatchNorm without running statistics normalises by the batch even in eval mode: the batch-of-one
    # gradient differs from the batched one, so the hooks engine must not use its backward
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                                torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3)).double()
    x, y = _double(M.image_batch(n=6, size=8))
    with pytest.warns(RuntimeWarning, match="mixes samples in eval mode"):
        est = gradsel.fisher(model, (x, y), engine="hooks", chunk_size=3, progress=False)
    _assert_matches(est, gradsel.fisher_loop(model, (x, y), progress=False))


# -- the one-time checks' decisions, kept per model between calls -----------------------------------------

class _Flagged(torch.nn.Module):
    """A flag that its forward reads: set, the batch's mean enters every sample's output (samples mix)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)
        self.mix = False
        self.config = {"mix": False}  # a dict config, as huggingface_hub's mixin gives smp models

    def forward(self, x):
        h = self.lin(x)
        return h + 0.5 * h.mean(0) if self.mix or self.config["mix"] else h


def _count_checks(monkeypatch):
    from gradsel.fisher.engines.hooks import HooksEngine

    runs = []
    check = HooksEngine._check_samples
    monkeypatch.setattr(HooksEngine, "_check_samples", lambda self, *a: (runs.append(1), check(self, *a))[1])
    return runs


def _mixing_forward(self, x):
    h = self.lin(x)
    return h - 0.3 * h.mean(0)


@needs_hooks
@pytest.mark.parametrize("change", ["flag", "config", "forward", "module", "parameter", "loss"])
def test_hooks_decisions_are_reused_until_the_model_or_loss_changes(change, monkeypatch):
    import types

    torch.manual_seed(0)
    model = _Flagged().double()
    batch = _double(M.mlp_batch(n=6))
    batch = (batch[0][:, :6].contiguous(), batch[1] % 3)
    runs = _count_checks(monkeypatch)
    ce = torch.nn.functional.cross_entropy
    _assert_matches(gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False),
                    gradsel.fisher_loop(model, batch, progress=False))
    assert len(runs) == 1
    gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
    assert len(runs) == 1  # same model, loss and batch structure: the first call's decision holds
    mixes = True
    if change == "flag":
        model.mix = True
    elif change == "config":
        model.config["mix"] = True
    elif change == "forward":
        model.forward = types.MethodType(_mixing_forward, model)
    elif change == "module":
        model.lin = torch.nn.Linear(6, 3).double()
        mixes = False
    elif change == "parameter":
        model.lin.weight = torch.nn.Parameter(torch.randn(3, 6, dtype=torch.float64))
        mixes = False
    else:
        mixes = False
    loss = (lambda out, b: ce(out, b[1])) if change == "loss" else None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        est = gradsel.fisher(model, batch, engine="hooks", chunk_size=3, loss=loss, progress=False)
    assert len(runs) == 2  # checked again
    assert any("mixes samples" in str(w.message) for w in seen) == mixes
    _assert_matches(est, gradsel.fisher_loop(model, batch, loss=loss, progress=False))
    if mixes:  # the decision to fall back is kept too, and said again
        with pytest.warns(RuntimeWarning, match="mixes samples"):
            again = gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
        assert len(runs) == 2
        _assert_matches(again, est)


@needs_hooks
def test_hooks_loss_form_follows_the_hf_config():
    # the model's own loss changes with config.problem_type: the per-sample form is found again
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=1, problem_type="regression", attn_implementation="eager")).double()
    batch = M.bert_batch(n=5)
    batch["labels"] = torch.rand(5, 1, generator=torch.Generator().manual_seed(2)).double()
    for problem in ("regression", "multi_label_classification"):
        model.config.problem_type = problem
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            est = gradsel.fisher(model, batch, engine="hooks", chunk_size=2, progress=False)
        _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))


# -- the conv weight routes: one batched matmul over unfolded inputs, or the kernel one sample at a time ----

class _ConvZoo(torch.nn.Module):
    """Strided, dilated, padded, grouped, depthwise (with a channel multiplier), 1×1 strided, a Conv1d, and
    a conv called twice; ``channels_last`` makes the 2-D inputs channels-last."""

    def __init__(self, channels_last: bool = False):
        super().__init__()
        C = torch.nn.Conv2d
        self.channels_last = channels_last
        self.stem = C(3, 8, 3, stride=2, padding=1)
        self.dilated = C(8, 8, 3, padding=2, dilation=2)
        self.grouped = C(8, 12, (3, 2), padding=(1, 0), groups=4)
        self.depthwise = C(12, 24, 3, padding=1, groups=12)
        self.pointwise = C(24, 8, 1, stride=2)
        self.twice = C(8, 8, 3, padding=1, bias=False)
        self.conv1d = torch.nn.Conv1d(8, 6, 3, stride=2, padding=1, dilation=1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.dilated(h))
        h = torch.tanh(self.grouped(h))
        h = torch.tanh(self.depthwise(h))[..., :h.shape[-1] - 1]
        h = torch.tanh(self.pointwise(h))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        h = torch.tanh(self.conv1d(h.flatten(2)))
        return self.head(h.mean(2))


def _conv_zoo_on(route: str, channels_last: bool, monkeypatch, video: bool = False):
    """The conv zoo (``video``: the 3-D convolutions) in float64 with every conv forced onto ``route``; ``seen``
    records that the rule ran."""
    seen = []
    monkeypatch.setattr(rules, "_conv_route", lambda m, ds, n=None: (seen.append(route), route.split("_")[0])[1])
    if route == "matmul_blocks":  # a few output channels of every group at a time
        monkeypatch.setattr(rules, "CONV_BLOCK_BYTES", 600)
    torch.manual_seed(0)
    model = (M.video_convs() if video else _ConvZoo(channels_last)).double()
    x, y = _double(M.video_batch() if video else M.image_batch(n=5, size=12))
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) > 0.5
            for n, p in model.named_parameters()}
    return model, (x, y), mask, seen


@needs_hooks
@pytest.mark.parametrize("route", ["matmul", "matmul_blocks", "kernel", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_hooks_conv_routes_match_the_loop(route, channels_last, monkeypatch):
    pick = rules._conv_route
    model, batch, mask, seen = _conv_zoo_on(route, channels_last, monkeypatch)
    est, fell = _hooks_fallback(model, batch, per_sample=mask, chunk_size=3)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    assert fell == set() and seen and pick is not rules._conv_route
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@needs_hooks
@pytest.mark.parametrize("route", ["grouped", "grouped_blocks", "kernel"])
def test_hooks_3d_conv_routes_match_the_loop(route, monkeypatch):
    # (no matmul route: torch's unfold is 2-D only); the grouped route takes the samples as groups of one call
    if route == "grouped_blocks":  # two samples a call
        monkeypatch.setattr(rules, "GROUPED_BLOCK_BYTES", 2 * 6 * 3 * 27 * 8)
    model, batch, mask, seen = _conv_zoo_on(route, False, monkeypatch, video=True)
    est, fell = _hooks_fallback(model, batch, per_sample=mask, chunk_size=3)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    assert fell == set() and seen
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@pytest.mark.parametrize("route", ["matmul", "matmul_blocks", "kernel"])
def test_vmap_engine_shares_the_conv_routes(route, monkeypatch):
    """The vmap engine's conv rule is the same ConvWeightGrads: each route exact against the loop there too."""
    model, batch, mask, seen = _conv_zoo_on(route, False, monkeypatch)
    est = gradsel.fisher(model, batch, engine="vmap", per_sample=mask, chunk_size=3, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    assert seen  # the rule ran (for the convs called once), not vmap's own per-sample conv
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@pytest.mark.parametrize("route", ["grouped", "kernel"])
def test_vmap_engine_shares_the_3d_conv_routes(route, monkeypatch):
    # Conv3d too (with vmap's own per-sample conv, R3D-18 at 8×64², batch 8, took 2.65 s; with the rule, 1.55 s)
    model, batch, mask, seen = _conv_zoo_on(route, False, monkeypatch, video=True)
    est = gradsel.fisher(model, batch, engine="vmap", per_sample=mask, chunk_size=3, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    assert seen  # the rule ran (for the convs called once), not vmap's own per-sample conv
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), channels=st.integers(2, 4), multiplier=st.integers(1, 3), size=st.integers(1, 9),
       kernel=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 3), padding=st.integers(0, 3),
       two_d=st.booleans(), seed=st.integers(0, 2**16))
def test_depthwise_weight_grads_match_one_sample_at_a_time(n, channels, multiplier, size, kernel, stride, dilation,
                                                           padding, two_d, seed):
    conv = (torch.nn.Conv2d if two_d else torch.nn.Conv1d)(channels, channels * multiplier, kernel, stride=stride,
                                                           padding=padding, dilation=dilation, groups=channels)
    spatial = (size, size + 1) if two_d else (size,)
    assume(all(s + 2 * padding >= dilation * (kernel - 1) + 1 for s in spatial))
    g = torch.Generator().manual_seed(seed)
    conv = conv.double()
    x = torch.randn(n, channels, *spatial, generator=g, dtype=torch.float64)
    with torch.no_grad():
        d = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
    assert rules._conv_route(conv, [d]) == "depthwise"
    weight_grad = torch.nn.grad.conv2d_weight if two_d else torch.nn.grad.conv1d_weight
    ref = torch.stack([weight_grad(x[i:i + 1], conv.weight.shape, d[i:i + 1], stride=stride, padding=padding,
                                   dilation=dilation, groups=channels) for i in range(n)])
    got = rules._depthwise_weight_grads(conv, x, d)
    assert got.shape == (n, channels, multiplier, kernel ** (2 if two_d else 1))
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("route", ["matmul", "kernel"])
def test_conv_routes_read_each_samples_rows(engine, route, monkeypatch):
    # TNT convolves each image's patches, which dim 0 holds one sample's after another: every route sums a
    # sample's rows (the vmap engine's conv rule took the first sample's patches for all of them: 95% off)
    pick = rules._conv_route
    monkeypatch.setattr(rules, "_conv_route", lambda m, ds, n=None: "depthwise" if pick(m, ds, n) == "depthwise"
                        else route)
    torch.manual_seed(0)
    model = M.patch_conv().double()
    batch = _double(M.image_batch(n=5, size=8))
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) > 0.5
            for n, p in model.named_parameters()}
    est = gradsel.fisher(model, batch, engine=engine, per_sample=mask, chunk_size=3, progress=False)
    ref = gradsel.fisher_loop(model, batch, per_sample=mask, progress=False)
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()
    if engine == "hooks":
        assert _hooks_fallback(model, batch)[1] == set()  # the patches are each sample's rows, not the fallback's


def test_hooks_conv_route_by_positions():
    from gradsel.fisher.engines import hooks

    conv = torch.nn.Conv2d(4, 4, 3)
    small = [torch.zeros(2, 4, 8, 8)]  # 64 positions a sample
    assert rules._conv_route(conv, small) == "matmul"
    assert rules._conv_route(conv, small + small) == "kernel"  # two calls: 128 positions a sample
    assert rules._conv_route(conv, [torch.zeros(2, 4, 32, 32)]) == "kernel"
    assert rules._conv_route(torch.nn.Conv2d(4, 4, 1, stride=2), [torch.zeros(2, 4, 32, 32)]) == "matmul"  # no unfold
    assert rules._conv_route(torch.nn.Conv2d(4, 4, 1, padding=1), [torch.zeros(2, 4, 32, 32)]) == "kernel"
    assert rules._conv_route(torch.nn.Conv2d(4, 8, 3, groups=4), [torch.zeros(2, 8, 32, 32)]) == "depthwise"
    assert rules._conv_route(torch.nn.Conv2d(4, 4, 3, groups=2), [torch.zeros(2, 4, 32, 32)]) == "kernel"


@needs_hooks
def test_hooks_forget_drops_the_decisions(monkeypatch):
    from gradsel.fisher.engines.hooks import forget

    torch.manual_seed(0)
    model = _Flagged().double()
    x, y = _double(M.mlp_batch(n=6))
    batch = (x[:, :6].contiguous(), y % 3)
    runs = _count_checks(monkeypatch)
    gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
    gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
    assert len(runs) == 1
    forget(model)
    gradsel.fisher(model, batch, engine="hooks", chunk_size=3, progress=False)
    assert len(runs) == 2


class _CachedBias(torch.nn.Module):
    """A parameter read through a cache made without grad (timm's LeViT caches its attention biases so in eval
    mode): it never reaches the loss, so its gradient is zero."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)
        self.bias = torch.nn.Parameter(torch.randn(3))
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            with torch.no_grad():
                self.cache = 2 * self.bias
        return self.lin(x) + self.cache


@pytest.mark.parametrize("engine", ["loop", "hooks", "auto"])
def test_a_candidate_that_never_reaches_the_loss_has_zero_fisher(engine):
    torch.manual_seed(0)
    model = _CachedBias().double()
    batch = _double(M.mlp_batch(n=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est = gradsel.fisher(model, batch, params=["bias"], engine=engine, progress=False, per_sample=True)
    assert est["bias"].abs().max() == 0 and est.per_sample.abs().max() == 0 and est.num_samples == 4


def test_candidates_with_a_zero_fisher_everywhere_are_named():
    torch.manual_seed(0)
    model = M.bert_lora(train_b=False)  # B = 0: every lora_A gradient is zero
    with pytest.warns(RuntimeWarning, match=r"(\d+) of (\d+) candidate tensors have a zero Fisher .*lora_A") as said:
        gradsel.fisher(model, M.bert_batch(), progress=False)
    (message,) = [str(w.message) for w in said if "zero Fisher" in str(w.message)]
    n_a = sum("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    assert message.startswith(f"gradsel.fisher: {n_a} of ") and "lora_B" not in message
    trained = M.bert_lora(train_b=True)  # B moved off zero: every candidate has a signal, and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gradsel.fisher(trained, M.bert_batch(), progress=False)


class _SharedModule(torch.nn.Module):
    """A submodule registered at two paths (timm CoaT's ConvPosEnc: ``cpe1`` and ``serial_blocks1.0.cpe``) and
    a weight tied across two modules (GPT-2's LM head)."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Linear(6, 6)
        self.blocks = torch.nn.ModuleList([torch.nn.Module()])
        self.blocks[0].pos = self.pos
        self.blocks[0].lin = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)
        self.tied = torch.nn.Linear(6, 3)
        self.tied.weight = self.head.weight

    def forward(self, x):
        h = self.blocks[0].lin(self.blocks[0].pos(x)) + self.pos(x)
        return self.head(h) + self.tied(torch.tanh(h))


@pytest.mark.parametrize("engine", ["loop", "vmap", "hooks", "auto"])
def test_estimation_leaves_shared_modules_and_tied_weights_as_they_were(engine):
    # torch.func.functional_call (tie_weights=True) restores a module registered at two paths with the tensor
    # it swapped in: after one estimate the model's nn.Parameter was a detached tensor, and training then
    # skipped it silently
    torch.manual_seed(0)
    model = _SharedModule().double()
    before = dict(model.named_parameters())
    x, y = _double(M.mlp_batch(n=5))
    plain = copy.deepcopy(model)
    ref = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
    for i in range(5):  # the reference without torch.func: one backward per sample
        plain.zero_grad()
        torch.nn.functional.cross_entropy(plain(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in plain.named_parameters():
            ref[n] += p.grad ** 2 / 5
    for _ in range(2):
        est = gradsel.fisher(model, (x, y), engine=engine, chunk_size=5, progress=False)
        after = dict(model.named_parameters())
        assert list(after) == list(before)
        assert all(after[n] is before[n] and isinstance(after[n], torch.nn.Parameter) for n in before)
        assert model.blocks[0].pos.weight is model.pos.weight and model.tied.weight is model.head.weight
        _assert_matches(est, ref)


class _ReadsItsChild(torch.nn.Module):
    """torchvision's Swin attention: it owns a table and passes its child Linear's weight to F.linear itself,
    so the Linear module never runs."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(6, 6)
        self.table = torch.nn.Parameter(torch.randn(6, 6) * 0.3)

    def forward(self, x):
        return torch.tanh(torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)) @ self.table


@needs_hooks
def test_hooks_gives_weights_read_by_a_parent_to_its_local_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), _ReadsItsChild(), torch.nn.Linear(6, 3)).double()
    batch = _double(M.mlp_batch(n=6))
    est, fell = _hooks_fallback(model, batch, chunk_size=3)
    _assert_matches(est, gradsel.fisher_loop(model, batch, progress=False))
    assert fell == set()  # 1.qkv's weight and bias: the module-local gradient of 1, not the whole-model fallback


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 3), dims=st.integers(1, 3),
       calls=st.integers(1, 2), norm=st.sampled_from(["batch", "group", "timm batch + act", "timm group + act"]),
       layout=st.sampled_from(["contiguous", "input channels last", "gradient channels last", "gradient transposed"]),
       seed=st.integers(0, 2**16))
def test_norm_rules_one_pass_match_per_sample_autograd(n, groups, per_group, dims, calls, norm, layout, seed):
    """BatchNorm (running statistics) and GroupNorm, alone or as timm's norm + activation layers, take each
    sample's Σ d·x̂ and Σ d from one eval-mode BatchNorm backward with the sample folded into the channel: against
    torch.func's per-sample gradients of the layer, over 1-3 spatial dims, several calls of the layer, and inputs
    or gradients that are not contiguous."""
    hooks = importlib.import_module("gradsel.fisher.engines.hooks")
    c = groups * per_group
    g = torch.Generator().manual_seed(seed)
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct

    if norm == "batch":
        layer = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[dims - 1](c)
        rule = hooks._batchnorm
    elif norm == "timm batch + act":  # the norm's gradient passed back through ReLU6 first
        layer, rule, dims = BatchNormAct2d(c, act_layer=torch.nn.ReLU6), hooks._norm_act, 2
    elif norm == "group":
        layer, rule = torch.nn.GroupNorm(groups, c), hooks._groupnorm
    else:
        layer, rule = GroupNormAct(c, num_groups=groups, act_layer=torch.nn.SiLU), hooks._norm_act
    layer = layer.double().eval()
    with torch.no_grad():
        if "batch" in norm:
            layer.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        layer.weight.copy_(torch.randn(c, generator=g, dtype=torch.float64))  # ReLU6 cuts at both ends
        layer.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    shape = (n, c) + (3, 4, 2)[:dims]
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(calls)]
    ds = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(calls)]
    def last(t):  # the same values, laid out with the channels moving fastest
        return t.movedim(1, -1).contiguous().movedim(-1, 1)

    if layout == "input channels last":
        xs = [last(x) for x in xs]
    elif layout == "gradient channels last":  # the layout torch's CPU batch-norm backward misreads (layout.py)
        ds = [last(d) for d in ds]
    elif layout == "gradient transposed":
        ds = [d.transpose(0, -1).contiguous().transpose(0, -1) for d in ds]
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def one(p, x, d):  # one sample's <layer(x), d> over every call: its gradient is that sample's
        return sum((torch.func.functional_call(layer, p, (xi.unsqueeze(0),)) * di.unsqueeze(0)).sum()
                   for xi, di in zip(x, d))

    ref = torch.func.vmap(torch.func.grad(one), in_dims=(None, 1, 1))(params, torch.stack(xs), torch.stack(ds))
    got = rule(layer, xs, ds, {"weight", "bias"}, n)
    for k in ("weight", "bias"):
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12)


@needs_hooks
def test_hooks_norm_layers_take_the_one_pass_sums(monkeypatch):
    """The models' BatchNorm and GroupNorm layers reach the one-pass sums, and the engine stays exact there."""
    hooks = importlib.import_module("gradsel.fisher.engines.hooks")
    calls = []
    sums = hooks._normalized_channel_sums
    monkeypatch.setattr(hooks, "_normalized_channel_sums", lambda *a: calls.append(len(a[0])) or sums(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 6, 3), torch.nn.GroupNorm(3, 6), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 16, 3)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    batch = (torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,)))
    mask = {k: torch.rand(v.shape) < 0.5 for k, v in model.named_parameters()}
    est, fell = _hooks_fallback(model, [batch], per_sample=mask, chunk_size=3)
    ref = gradsel.fisher_loop(model, [batch], per_sample=mask, progress=False)
    assert fell == set() and len(calls) == 4  # both norms, both chunks
    _assert_matches(est, ref)
    assert (est.per_sample - ref.per_sample).abs().max() <= TOL * ref.per_sample.abs().max()
