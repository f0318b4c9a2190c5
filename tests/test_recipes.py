"""The recipes' smoke configs run end to end: tables with the promised columns, exact budgets, frozen
weights that did not move."""

from __future__ import annotations

import csv

import pytest

import gradsel


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_nlp_smoke_end_to_end(tmp_path):
    from recipes.nlp.run import main

    out = main(["--config", "smoke", "--out", str(tmp_path)])
    runs = _read(out / "runs.csv")
    methods = {r["method"] for r in runs}
    expected = {"lora", "lora_fish", "lora_rand", "lora_rev", "lora_fish_25", "fish_mask", "full"}
    if "ird" in gradsel.list_policies():
        expected.add("ird")
    assert methods == expected
    for r in runs:
        # trainable counted from the masks and requires_grad equals the budget the method promised
        assert int(r["trainable params"]) == int(r["budget"]), r["method"]
        assert r["masked unchanged"] == "True", r["method"]
        assert int(r["elements changed"]) <= int(r["trainable params"]), r["method"]
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    by = {r["method"]: r for r in runs}
    assert int(by["lora_fish"]["trainable params"]) == int(by["lora"]["trainable params"])  # equal budget
    assert int(by["lora_fish_25"]["trainable params"]) < int(by["lora"]["trainable params"])
    # shipped artifacts, measured on disk: a selection's sparse delta is far below a full checkpoint
    assert float(by["fish_mask"]["artifact MiB"]) < 0.1 * float(by["full"]["artifact MiB"])
    assert float(by["lora"]["artifact MiB"]) < float(by["full"]["artifact MiB"])
    summary = (out / "summary.md").read_text()
    for column in ("trainable params", "accuracy (mean ± std)", "train time (s)", "peak train MiB", "fisher time (s)",
                   "artifact MiB"):
        assert column in summary
    assert (out / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"


def test_segmentation_smoke_end_to_end(tmp_path):
    from recipes.segmentation.run import main

    out = main(["--config", "smoke", "--out", str(tmp_path)])
    runs = _read(out / "runs.csv")
    methods = {r["method"] for r in runs}
    assert {"full", "decoder_only", "fish", "fish_large", "random", "reverse", "jsdrift"} <= methods
    for r in runs:
        assert r["masked unchanged"] == "True", r["method"]
        for col in ("in-domain IoU", "in-domain Dice", "zero-shot IoU", "zero-shot Dice"):
            assert 0.0 <= float(r[col]) <= 1.0
    by = {r["method"]: r for r in runs}
    assert float(by["full"]["trainable share"]) == 1.0
    assert float(by["decoder_only"]["trainable share"]) < 1.0
    assert by["fish"]["trainable params"] == by["random"]["trainable params"] == by["reverse"]["trainable params"]
    assert int(by["fish"]["trainable params"]) < int(by["fish_large"]["trainable params"])
    assert float(by["jsdrift"]["final trainable share"]) < 1.0  # the smoke config makes it freeze something
    summary = (out / "summary.md").read_text()
    for column in ("in-domain IoU", "zero-shot IoU", "trainable share", "backward/step (s)", "peak MiB"):
        assert column in summary
    for png in ("iou_vs_share.png", "overlays.png", "jsdrift_drift.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png


@pytest.mark.parametrize("config", ["demo", "full"])
def test_configs_parse_and_name_known_methods(config):
    from recipes import common
    from recipes.nlp import run as nlp
    from recipes.segmentation import run as seg

    _, a = common.load_config(config, nlp.CONFIGS)
    assert set(a["fish"]["methods"]) <= set(nlp.ALL_METHODS) and a["model"] == "minilm"
    _, b = common.load_config(config, seg.CONFIGS)
    assert set(b["methods"]) <= set(seg.ALL_METHODS)
    if config == "full":
        assert len(a["seeds"]) >= 3 and len(b["seeds"]) >= 3


def test_quickstart_demo_end_to_end(tmp_path):
    """``make demo``'s job, shortened: three methods, counts from the selection, a delta far below a checkpoint,
    and (inside each run) no masked entry moved."""
    from recipes.quickstart import KEEP, main

    rows = main(["--steps", "2", "--samples", "16", "--warmup", "1", "--max-test", "32", "--out", str(tmp_path)])
    by = {r["method"]: r for r in rows}
    assert list(by) == ["head only", "FISH Mask 0.5%", "full fine-tuning"]
    sel = gradsel.Selection.load(tmp_path / "selection.safetensors")
    assert sel.selected() == round(KEEP * sel.total())
    assert by["FISH Mask 0.5%"]["trainable params"] == sel.trainable()
    assert by["head only"]["trainable params"] == sum(sel.masks[n].numel() for n in sel.always)
    assert by["FISH Mask 0.5%"]["artifact MiB"] < 0.05 * by["full fine-tuning"]["artifact MiB"]
    assert (tmp_path / "quickstart.png").stat().st_size > 0 and "| FISH Mask 0.5%" in (tmp_path / "summary.md").read_text()
