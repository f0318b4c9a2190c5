"""The recipes' smoke configs run end to end: tables with the promised columns, exact budgets, frozen
weights that did not move."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

import gradsel
from gradsel.errors import GradselError


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_nlp_smoke_end_to_end(tmp_path):
    from recipes.nlp.run import main

    out = main(["--config", "smoke", "--out", str(tmp_path)])
    runs = _read(out / "runs.csv")
    methods = {r["method"] for r in runs}
    expected = {"lora", "lora_fish", "lora_rand", "lora_rev", "lora_fish_25", "fish_mask", "fish_row", "fish_head",
                "jsdrift", "full"}
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
    # the smoke config trains through the sparse path: the optimizer holds moments for exactly the elements
    # that train (a dense AdamW would hold them for every requires_grad tensor, masked entries included)
    for m in ("fish_mask", "fish_row", "ird", "lora_fish", "lora_rand", "lora_fish_25"):
        if m in by:
            assert by[m]["path"] == "sparse", m
            assert int(by[m]["optimizer state elements"]) == int(by[m]["trainable params"]), m
    # fish_row: same element budget as fish_mask, whole rows, and backward formed only the touched rows
    assert by["fish_row"]["trainable params"] == by["fish_mask"]["trainable params"]
    assert int(by["fish_row"]["row-sparse layers"]) > 0
    assert 0 < int(by["fish_row"]["rows trained"]) < int(by["fish_row"]["rows"])
    # fish_head: the same budget with attention rows taken a head at a time, so other rows than fish_row's
    assert by["fish_head"]["trainable params"] == by["fish_mask"]["trainable params"]
    assert int(by["fish_head"]["row-sparse layers"]) > 0
    assert by["fish_head"]["rows trained"] != by["fish_row"]["rows trained"]
    # jsdrift froze whole groups in four steps; what froze did not move afterwards (digest at the freeze)
    js = by["jsdrift"]
    assert int(js["groups frozen"]) >= 1 and float(js["final trainable share"]) < 1.0
    assert float(js["mean trainable share"]) < 1.0 and float(js["signal share"]) > 0.0
    assert int(js["optimizer state elements"]) < int(js["trainable params"])  # frozen tensors' moments released
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


def _smoke_variant(tmp_path, module, edit):
    from recipes import common

    _, cfg = common.load_config("smoke", module.CONFIGS)
    edit(cfg)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_nlp_dense_path_keeps_the_published_behaviour(tmp_path):
    """``training.path: dense`` (what the published tables ran): the Trainer's AdamW holds moments for every
    element of the masked tensors, and the guard keeps the masked entries where they were."""
    from recipes.nlp import run

    config = _smoke_variant(tmp_path, run, lambda c: c["training"].update(path="dense"))
    out = run.main(["--config", config, "--out", str(tmp_path / "out"), "--methods", "fish_mask"])
    (r,) = _read(out / "runs.csv")
    assert r["path"] == "dense" and r["masked unchanged"] == "True"
    assert int(r["trainable params"]) == int(r["budget"])
    assert int(r["optimizer state elements"]) > 10 * int(r["trainable params"])


def test_nlp_unknown_training_path_is_refused(tmp_path):
    from recipes.nlp import run

    config = _smoke_variant(tmp_path, run, lambda c: c["training"].update(path="fast"))
    with pytest.raises(GradselError, match="training.path='fast'"):
        run.main(["--config", config, "--out", str(tmp_path / "out"), "--methods", "fish_mask"])


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
    # jsdrift_encoder freezes encoder stages only: the decoder's share (everything outside the encoder) stays
    enc = by["jsdrift_encoder"]
    assert int(enc["groups frozen"]) >= 1 and all(g.startswith("encoder.") for g in enc["freeze steps"].split())
    assert float(enc["final trainable share"]) >= float(by["decoder_only"]["trainable share"])
    # fish_row: fish's budget by whole output channels, sparse optimizer state, channel-sparse backward
    assert by["fish_row"]["trainable params"] == by["fish"]["trainable params"]
    assert int(by["fish_row"]["optimizer state elements"]) == int(by["fish_row"]["trainable params"])
    assert int(by["fish_row"]["row-sparse layers"]) > 0
    assert 0 < int(by["fish_row"]["rows trained"]) < int(by["fish_row"]["rows"])
    assert int(by["fish"]["optimizer state elements"]) > int(by["fish"]["trainable params"])  # dense AdamW
    summary = (out / "summary.md").read_text()
    for column in ("in-domain IoU", "zero-shot IoU", "trainable share", "backward/step (s)", "peak MiB"):
        assert column in summary
    for png in ("iou_vs_share.png", "overlays.png", "jsdrift_drift.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png


def test_segmentation_jsdrift_fast_preset_from_config(tmp_path):
    """``jsdrift: {preset: fast, ...}`` reaches the policy: the training-gradient signal (no probe time),
    freezing from the input side, and something froze."""
    from recipes.segmentation import run

    def edit(c):
        c["jsdrift"] = {"preset": "fast", "interval": 1, "window": 1, "patience": 1, "tol": 0.5}
        c["training"]["steps"] = 5

    out = run.main(["--config", _smoke_variant(tmp_path, run, edit), "--out", str(tmp_path / "out"),
                    "--methods", "jsdrift"])
    (r,) = _read(out / "runs.csv")
    assert r["masked unchanged"] == "True"
    assert int(r["groups frozen"]) >= 1 and float(r["final trainable share"]) < 1.0
    assert r["freeze steps"].startswith("encoder.stage1@")  # network order: the input side first
    assert float(r["fisher time (s)"]) < 1.0  # no probe set to build: the signal is the training gradients


def test_segmentation_resume_keeps_finished_runs(tmp_path, capsys):
    """``--resume`` reads finished runs back from out/jobs instead of training them again, and the table
    holds them beside the new ones; train CPU time is recorded beside the wall time."""
    from recipes.segmentation import run

    def edit(c):
        c["training"]["steps"] = 2

    cfg = _smoke_variant(tmp_path, run, edit)
    out = run.main(["--config", cfg, "--out", str(tmp_path / "out"), "--methods", "decoder_only"])
    kept = (out / "jobs" / "decoder_only_seed0.json").read_text()
    capsys.readouterr()
    run.main(["--config", cfg, "--out", str(out), "--methods", "decoder_only", "full", "--resume"])
    said = capsys.readouterr().out
    assert "decoder_only seed 0: kept from" in said and "full seed 0: IoU" in said
    assert (out / "jobs" / "decoder_only_seed0.json").read_text() == kept  # not trained again
    runs = {r["method"]: r for r in _read(out / "runs.csv")}
    assert set(runs) == {"decoder_only", "full"}
    assert all(0 < float(r["train CPU (s)"]) for r in runs.values())


@pytest.mark.parametrize("config", ["demo", "full", "long"])
def test_configs_parse_and_name_known_methods(config):
    from recipes import common
    from recipes.nlp import run as nlp
    from recipes.segmentation import run as seg

    _, a = common.load_config(config, nlp.CONFIGS)
    assert set(a["fish"]["methods"]) <= set(nlp.ALL_METHODS) and a["model"] == "minilm"
    _, b = common.load_config(config, seg.CONFIGS)
    assert set(b["methods"]) <= set(seg.ALL_METHODS)
    if config in ("full", "long"):
        assert len(a["seeds"]) >= 3 and len(b["seeds"]) >= 3
    if config == "long":  # long enough for the controls to learn, trained the way that saves
        tr = a["training"]
        assert tr["path"] == "sparse"
        assert (a["dataset"]["max_train"] // tr["batch_size"]) * tr["epochs"] >= 240
        assert b["training"]["steps"] >= 400
        assert {"fish_row", "jsdrift", "fish_mask", "full", "lora"} <= set(a["fish"]["methods"])
        assert {"fish_row", "jsdrift", "fish", "random", "full", "decoder_only"} <= set(b["methods"])


def test_long_val_config_names_its_variants_and_keeps_the_long_training():
    from recipes import common
    from recipes.nlp import run as nlp

    _, val = common.load_config("long_val", nlp.CONFIGS)
    _, long = common.load_config("long", nlp.CONFIGS)
    assert set(val["fish"]["methods"]) <= set(common.method_names(val, nlp.ALL_METHODS)) and val["dataset"]["validation"] > 0
    assert {k: v for k, v in val["dataset"].items() if k != "validation"} == long["dataset"]
    assert (val["training"], val["seeds"], val["jsdrift"]) == (long["training"], long["seeds"], long["jsdrift"])
    for name in val["jsdrift_variants"]:  # every variant builds a policy; the callback's option is not passed
        nlp._jsdrift_policy(val, name)
    assert common.jsdrift_options(val, "jsdrift_nostop")["stop_when_done"] is False
    with pytest.raises(GradselError, match="must start with 'jsdrift_'"):
        common.method_names({"jsdrift_variants": {"slow": {}}}, nlp.ALL_METHODS)


def test_segmentation_long_val_keeps_long_and_resolves_each_variant():
    from recipes import common
    from recipes.segmentation import run as seg

    _, val = common.load_config("long_val", seg.CONFIGS)
    _, long = common.load_config("long", seg.CONFIGS)
    assert set(val["methods"]) <= set(common.method_names(val, seg.ALL_METHODS)) and "full" in val["methods"]
    assert {k: v for k, v in val["dataset"].items() if k != "n_validation"} == long["dataset"]
    assert val["dataset"]["n_validation"] > 0
    assert (val["training"], val["seeds"], val["fish"]) == (long["training"], long["seeds"], long["fish"])
    assert seg.jsdrift_setup(val, "jsdrift_encoder") == ("jsdrift_encoder", {"preset": "fast", "floor": 0})
    assert seg.jsdrift_setup(val, "jsdrift") == ("jsdrift", {"preset": "fast"})  # jsdrift's own floor
    for name, options in val["jsdrift_variants"].items():
        base, js = seg.jsdrift_setup(val, name)
        assert base == "jsdrift_encoder" and "base" not in js
        assert js == {"preset": "fast", "floor": 0, **{k: v for k, v in options.items() if k != "base"}}
    assert seg.jsdrift_setup(val, "jsdrift_enc_floor2")[1]["floor"] == 2  # the variant's floor wins over 0
    with pytest.raises(GradselError, match="base='fish'"):
        seg.jsdrift_setup({"jsdrift_variants": {"jsdrift_x": {"base": "fish"}}}, "jsdrift_x")


@pytest.mark.parametrize("config", ["long_val_anneal", "long_val_warmup"])
def test_segmentation_long_val_siblings_change_only_the_variants_and_each_reaches_jsdrift(config):
    from gradsel.policies.jsdrift import JSDrift
    from recipes import common
    from recipes.segmentation import run as seg

    _, sib = common.load_config(config, seg.CONFIGS)
    _, val = common.load_config("long_val", seg.CONFIGS)
    assert {k: v for k, v in sib.items() if k not in ("methods", "jsdrift_variants")} == \
        {k: v for k, v in val.items() if k not in ("methods", "jsdrift_variants")}
    assert sib["methods"][0] == "full" and set(sib["methods"][1:]) == set(sib["jsdrift_variants"])
    for name, options in sib["jsdrift_variants"].items():
        base, js = seg.jsdrift_setup(sib, name)
        assert base == "jsdrift_encoder" and js["floor"] == 0
        built = JSDrift(**js).options
        assert all(built[k] == v for k, v in options.items() if k != "base"), name  # every option reaches it


def test_trainable_count_cache_follows_mask_edits_and_replacements():
    import torch
    from torch import nn

    from recipes import common

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    masks = {"0.weight": torch.zeros(3, 4, dtype=torch.bool)}
    masks["0.weight"][0] = True
    cache: dict = {}
    expect = 4 + 3 + 6 + 2
    assert common.trainable_count(model, masks, cache) == common.trainable_count(model, masks) == expect
    masks["0.weight"][1, :2] = True  # in place, as jsdrift freezes: the version moves, the count follows
    assert common.trainable_count(model, masks, cache) == expect + 2
    masks["0.weight"] = torch.ones(3, 4, dtype=torch.bool)  # a new tensor
    assert common.trainable_count(model, masks, cache) == expect + 8
    model[1].weight.requires_grad_(False)
    assert common.trainable_count(model, masks, cache) == expect + 8 - 6


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


def test_segmentation_cosine_schedule_goes_from_the_lr_to_zero_and_long_val_cosine_changes_only_that():
    from recipes import common
    from recipes.segmentation import run as seg

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    assert seg.lr_schedule(opt, "constant", 4) is None
    sched = seg.lr_schedule(opt, "cosine", 4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2 * (1 + 2 ** -0.5) / 2, 0.1, 0.2 * (1 - 2 ** -0.5) / 2, 0.0])
    with pytest.raises(GradselError, match="'linear'"):
        seg.lr_schedule(opt, "linear", 4)
    _, cos = common.load_config("long_val_cosine", seg.CONFIGS)
    _, val = common.load_config("long_val", seg.CONFIGS)
    assert cos["training"] == {**val["training"], "schedule": "cosine"}
    assert {k: v for k, v in cos.items() if k not in ("training", "methods", "jsdrift_variants")} == \
        {k: v for k, v in val.items() if k not in ("training", "methods", "jsdrift_variants")}
