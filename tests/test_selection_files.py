"""Selection files prove their content: a changed byte or field fails loudly; saves are atomic and clean."""

from __future__ import annotations

import copy
import json
import os
import stat
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradsel
from gradsel import GradselError
from gradsel._io import _host
from gradsel.delta import SparseDelta

from . import models as M


# -- the safetensors layout: u64 little-endian header length, JSON header, then the tensor bytes -----------
def _read(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), bytearray(data[8 + n:])


def _write(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(body))
    return path


def _edit_meta(path, out, change):
    """Copy ``path`` to ``out`` with ``change(meta_dict, safetensors_header)`` applied to the gradsel metadata."""
    header, body = _read(path)
    meta = json.loads(header["__metadata__"]["gradsel"])
    change(meta, header)
    header["__metadata__"]["gradsel"] = json.dumps(meta)
    return _write(out, header, body)


@pytest.fixture
def saved(tmp_path):
    model = M.mlp()
    sel = gradsel.select(model, M.mlp_batch(), "fish", keep=0.3, progress=False)
    return model, sel, sel.save(tmp_path / "sel.safetensors")


def _same(a, b):
    assert sorted(a.masks) == sorted(b.masks)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.metadata() == b.metadata()


def test_round_trip_is_exact_and_the_file_carries_a_hash(saved):
    model, sel, path = saved
    back = gradsel.Selection.load(path, model)
    _same(sel, back)
    meta = _read(path)[0]["__metadata__"]
    assert json.loads(meta["gradsel"])["format"] == 2 and len(meta["gradsel_sha256"]) == 64


def test_two_swapped_mask_bytes_are_refused(saved, tmp_path):
    model, sel, path = saved
    header, body = _read(path)
    lo, hi = header["0.weight"]["data_offsets"]
    flat = sel.masks["0.weight"].reshape(-1)
    i, j = int(flat.nonzero()[0]), int((~flat).nonzero()[0])  # one selected, one not: same count after swap
    body[lo + i], body[lo + j] = body[lo + j], body[lo + i]
    swapped = _write(tmp_path / "swapped.safetensors", header, body)
    with pytest.raises(GradselError, match="changed or corrupted after it was saved.*Re-create the selection"):
        gradsel.Selection.load(swapped, model)
    # The same swap in an unhashed (format 1) file loads as a different mask with the same count: the hash
    # is what catches it.
    del header["__metadata__"]["gradsel_sha256"]
    old = _edit_meta(_write(tmp_path / "old.safetensors", header, body), tmp_path / "old.safetensors",
                     lambda m, h: m.update(format=1))
    wrong = gradsel.Selection.load(old, model, allow_unhashed=True)
    assert wrong.selected() == sel.selected()
    assert not torch.equal(wrong.masks["0.weight"], sel.masks["0.weight"])


@pytest.mark.parametrize("what", ["policy", "budget", "shapes", "seed", "options", "candidates order",
                                  "tensor shape", "tensor dtype", "hash removed", "hash replaced", "format 1"])
def test_any_change_to_metadata_is_refused(saved, tmp_path, what):
    model, sel, path = saved

    def change(meta, header):
        if what == "policy":
            meta["policy"] = "random"
        elif what == "budget":
            meta["budget"] += 1
        elif what == "shapes":
            meta["shapes"]["0.weight"] = [6, 16]
        elif what == "seed":
            meta["seed"] = 1
        elif what == "options":
            meta["options"]["extra"] = 1
        elif what == "candidates order":
            meta["candidates"] = meta["candidates"][::-1]
        elif what == "tensor shape":  # same bytes, transposed shape in the safetensors header
            header["0.weight"]["shape"] = header["0.weight"]["shape"][::-1]
        elif what == "tensor dtype":
            header["0.weight"]["dtype"] = "U8"
        elif what == "hash removed":
            del header["__metadata__"]["gradsel_sha256"]
        elif what == "hash replaced":
            header["__metadata__"]["gradsel_sha256"] = "0" * 64
        elif what == "format 1":  # claiming the old unhashed format while carrying a hash
            meta["format"] = 1

    bad = _edit_meta(path, tmp_path / "bad.safetensors", change)
    with pytest.raises(GradselError, match="changed or corrupted after it was saved"):
        gradsel.Selection.load(bad)


def test_format_1_files_name_the_missing_hash_and_can_be_resaved_on_request(saved, tmp_path):
    model, sel, path = saved
    header, body = _read(path)
    del header["__metadata__"]["gradsel_sha256"]
    old = _edit_meta(_write(tmp_path / "v1.safetensors", header, body), tmp_path / "v1.safetensors",
                     lambda m, h: m.update(format=1))
    with pytest.raises(GradselError, match="format 1, written before selection files carried a content hash"):
        gradsel.Selection.load(old)
    back = gradsel.Selection.load(old, model, allow_unhashed=True)
    assert all(torch.equal(back.masks[n], sel.masks[n]) for n in sel.masks)
    _same(sel, gradsel.Selection.load(back.save(tmp_path / "v2.safetensors"), model))
    newer = _edit_meta(path, tmp_path / "v3.safetensors", lambda m, h: m.update(format=3))
    with pytest.raises(GradselError, match="format 3; this gradsel reads formats 1 to 2: upgrade"):
        gradsel.Selection.load(newer)
    header, body = _read(path)
    foreign = _write(tmp_path / "f.safetensors", {**header, "__metadata__": {"format": "pt"}}, body)
    with pytest.raises(GradselError, match="not a gradsel selection file"):
        gradsel.Selection.load(foreign)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_save_killed_mid_write_keeps_the_old_file_and_the_next_save_or_load_removes_its_temp(saved, tmp_path):
    model, sel, path = saved
    before = path.read_bytes()
    # A real kill: a process that dies (SIGKILL) in the middle of writing the temp file.
    code = (
        "import os, signal, sys, torch, safetensors.torch, gradsel\n"
        "def half(tensors, filename, metadata=None):\n"
        "    open(filename, 'wb').write(b'\\0' * 50)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "safetensors.torch.save_file = half\n"
        "sel = gradsel.Selection.load(sys.argv[1])\n"
        "sel.save(sys.argv[1])\n")
    if os.name != "nt":
        proc = subprocess.run([sys.executable, "-c", code, str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == -9
        assert path.read_bytes() == before
        left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(left) == 1 and left[0].startswith("sel.safetensors.gradsel-")
    stale = tmp_path / f"sel.safetensors.gradsel-{_host()}-{_dead_pid()}-{'ab' * 8}.tmp"
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"half")  # what a killed safetensors write leaves in gradsel's folder
    live = tmp_path / f"sel.safetensors.gradsel-{_host()}-{os.getppid()}-{'cd' * 8}.tmp"  # a running process
    live.write_bytes(b"in use")
    other_host = tmp_path / f"sel.safetensors.gradsel-elsewhere-{_dead_pid()}-{'ef' * 8}.tmp"
    other_host.write_bytes(b"maybe in use")
    not_ours = tmp_path / "sel.safetensors.backup.tmp"
    not_ours.write_bytes(b"user file")
    other_target = tmp_path / f"other.safetensors.gradsel-{_host()}-{_dead_pid()}-{'01' * 8}.tmp"
    other_target.write_bytes(b"another path's temp")
    keep = {live.name, other_host.name, not_ours.name, other_target.name}

    _same(sel, gradsel.Selection.load(path, model))  # the old file intact; the load cleans
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")} == keep

    stale.write_bytes(b"half")  # a plain file of the pattern goes too
    sel2 = gradsel.select(model, M.mlp_batch(), "random", keep=5, progress=False)
    sel2.save(path)  # the save cleans too
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")} == keep
    _same(sel2, gradsel.Selection.load(path, model))


def test_an_interrupted_save_file_keeps_the_old_file_and_leaves_no_temp(saved, tmp_path, monkeypatch):
    import safetensors.torch

    model, sel, path = saved
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    other = gradsel.select(model, M.mlp_batch(), "random", keep=5, progress=False)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sel.safetensors"]
    monkeypatch.undo()
    _same(sel, gradsel.Selection.load(path, model))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_mode_the_umask_gives(saved, tmp_path, umask):
    model, sel, path = saved
    os.chmod(path, 0o600)  # replacing a file: the new one gets the umask's mode, like a fresh open()
    tuned = nn.Linear(4, 3)
    base = copy.deepcopy(tuned.state_dict())
    small = gradsel.select(tuned, None, "random", keep=2, params="weight", progress=False)
    with torch.no_grad():
        tuned.weight[small.masks["weight"]] += 1.0
    delta = SparseDelta.from_models(small, tuned, base)
    old = os.umask(umask)
    try:
        written = [sel.save(path), sel.save(tmp_path / "new" / "sel.safetensors"), delta.save(tmp_path / "d.st")]
    finally:
        os.umask(old)
    for p in written:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p
    _same(sel, gradsel.Selection.load(path, model))
    assert SparseDelta.load(tmp_path / "d.st").numel() == 2
