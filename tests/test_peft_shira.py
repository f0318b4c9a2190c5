"""A Fisher selection trained, saved, loaded and merged as a peft SHiRA adapter."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

import gradsel
from gradsel import GradselError
from gradsel.integrations.peft import shira_config, shira_mask_fn, shira_select

from . import models as M

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_through_peft_moves_only_the_selected_entries(tmp_path):
    from peft import PeftModel, get_peft_model

    model = M.bert()
    base = copy.deepcopy(model.state_dict())
    sel = shira_select(model, M.bert_batch(n=16), r=2, always="classifier.*", progress=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in sel.candidates:  # exactly r * (in + out) per layer, the top of the Fisher within it
        layer = linears[name[: -len(".weight")]]
        assert int(sel.masks[name].sum()) == 2 * (layer.in_features + layer.out_features)
    scores = gradsel.fisher(model, M.bert_batch(n=16), params=sel.candidates, progress=False)
    name = sel.candidates[0]
    assert scores[name][sel.masks[name]].min() >= scores[name][~sel.masks[name]].max()

    config = shira_config(sel, model)
    assert config.r == 2 and config.modules_to_save == ["classifier"]
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for s in range(4):
        opt.zero_grad()
        peft_model(**M.bert_batch(n=8, seed=s)).loss.backward()
        opt.step()
    peft_model.eval()
    batch = M.bert_batch(n=6, seed=20)
    out = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    # peft's own load (no gradsel needed) onto a fresh base, then merge
    loaded = PeftModel.from_pretrained(M.bert(), tmp_path / "adapter").eval()
    assert torch.equal(loaded(**batch).logits, out)
    merged = loaded.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, out, atol=1e-6)
    changed_total = 0
    for n, p in merged.named_parameters():
        changed = p.detach() != base[n]
        if n in sel.masks:
            assert not bool((changed & ~sel.masks[n]).any()), f"{n}: an unselected entry changed"
            changed_total += int(changed.sum())
        else:
            assert not bool(changed.any()), f"{n} is outside the selection but changed"
    assert changed_total > 0.95 * sel.trainable()


def test_a_global_selection_that_fits_no_single_r_is_explained():
    model = M.bert()
    sel = gradsel.select(model, M.bert_batch(n=16), "fish", keep=0.05, params=torch.nn.Linear,
                         exclude="*.bias", progress=False)
    with pytest.raises(GradselError, match=r"r\*\(in\+out\) entries in every layer.*shira_select"):
        shira_config(sel, model)
    with_bias = gradsel.select(model, M.bert_batch(n=16), "fish", keep=0.05, progress=False)
    with pytest.raises(GradselError, match="also selects .*LayerNorm|also selects .*bias|also selects .*embeddings"):
        shira_config(with_bias, model)
    fn = shira_mask_fn(sel, model)
    with pytest.raises(GradselError, match="not in the selection"):
        fn(torch.nn.Linear(32, 32), 1)
    query = model.bert.encoder.layer[0].attention.self.query
    with pytest.raises(GradselError, match="SHiRA with r=1 trains exactly"):
        fn(query, 1)


def test_a_peft_without_shira_says_so(monkeypatch):
    old = types.ModuleType("peft")
    old.__version__ = "0.10.0"
    monkeypatch.setitem(sys.modules, "peft", old)
    model = M.mlp()
    sel = gradsel.select(model, None, "random", keep=4, progress=False)
    with pytest.raises(GradselError, match=r"peft 0.10.0 has no SHiRA .*pip install -U 'peft>=0.17'"):
        shira_config(sel, model)
    with pytest.raises(GradselError, match="no SHiRA"):
        shira_mask_fn(sel, model)
