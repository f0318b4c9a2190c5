"""Safe file writes shared by selections and deltas, and the content hash that selection files carry.

A save writes into a folder ``<name>.gradsel-<host>-<pid>-<token>.tmp`` beside the target (safetensors
puts its own temp file beside what it writes, so that lands inside too), then renames the finished file
over the target: a killed save leaves the old file intact. A temp folder whose process is gone (same host,
pid not running) is stale: the next save or load of that path removes it. Files get the mode ``open()``
would give them (``0o666 & ~umask``), not the 0600 of a temp file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path
from typing import Iterable

import torch

_TMP_TAG = "gradsel"


def _host() -> str:
    """This machine, as 8 hex digits (a pid names a process only on its own host)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name) + rf"\.{_TMP_TAG}-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{{16}}\.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never call it; assume in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp folders of earlier gradsel saves of ``path`` whose writing process is gone.

    Only names of gradsel's own pattern are touched, and only those made on this host by a pid that is no
    longer running (one from another host, or from a live process, may be in use). Returns what it removed.
    """
    path = Path(path)
    pattern, host, removed = _tmp_pattern(path.name), _host(), []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:  # gone meanwhile, or not ours to remove (permissions): leave it
            pass
    return removed


def _fsync(p: Path) -> None:
    if os.name == "nt" and p.is_dir():
        return
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temp folder beside ``path`` and a rename.

    An interrupted write never leaves a half file under ``path``; an existing file there is replaced only
    once the new one is complete (and flushed to disk). Stale temp folders of earlier killed saves of
    ``path`` are removed first. The file's mode is ``0o666 & ~umask``, as with ``open(path, "w")``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    while True:  # a private folder: safetensors writes its own temp file beside its target, inside it
        tmp = path.with_name(f"{path.name}.{_TMP_TAG}-{_host()}-{os.getpid()}-{secrets.token_hex(8)}.tmp")
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    try:
        # mkdir applied the umask to 0o777, as open() applies it to 0o666: the mode open() would give
        mode = stat.S_IMODE(os.stat(tmp).st_mode) & 0o666
        staged = tmp / path.name
        save_file(tensors, str(staged), metadata=metadata)
        os.chmod(staged, mode)  # safetensors writes 0600
        _fsync(staged)
        os.replace(staged, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` in C order (bool as one byte per element)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def content_sha256(header: bytes, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over ``header`` then, per ``(name, tensor)``, its name, dtype, shape and bytes."""
    h = hashlib.sha256(header)
    for name, t in tensors:
        h.update(f"\0{name}\0{str(t.dtype).replace('torch.', '')}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
