"""Small helpers every layer uses (EDM's torch_utils/misc.py): device moves, autocast for a device,
atomic file writes, the label palette. No imports from the rest of the library.

    batch = to_device(batch, device)                  # tensors moved, strings and ints kept
    with autocast(device): ...                        # bf16 on CUDA, nothing on the CPU
    atomic_write(path, lambda tmp: save(tmp))         # all or nothing: tmp file, fsync, rename, fsync dir
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

# label -> RGB for masks (0 background, 1 LV cavity / LV, 2 myocardium, 3 LA / RV, then spares)
PALETTE = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 240], [240, 200, 40], [200, 80, 220]],
                   np.uint8)


def to_device(batch: dict, device, non_blocking: bool = True) -> dict:
    """A batch dict with every tensor on `device`; other values (strings, ints, lists) unchanged."""
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast(device):
    """bf16 autocast on a CUDA device (the project's mixed precision, docs/ARCHITECTURE.md §Tensors);
    a no-op context on the CPU, where everything runs in float32."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_write(path, write) -> None:
    """Call write(tmp_path) and move the result onto `path` atomically: a temporary file in the same
    folder, fsync, os.replace, then fsync of the folder so that the rename itself is durable. A kill
    at any moment leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)
