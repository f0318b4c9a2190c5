"""Safe file writes shared by selections and deltas."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temp file in the same folder and a rename.

    An interrupted write never leaves a half file under ``path``; an existing file there is replaced only
    once the new one is complete.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
