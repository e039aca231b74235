"""Every write a checkpoint makes, each atomic: a reader sees the old file or the new, never half.

A file goes to ``<name>.part``/``.tmp``, is fsynced and renamed over its name; a directory is
fsynced after its entries change; a checkpoint directory is published by one rename, after
which ``latest`` names it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a directory's entries (renames, new files), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON to ``<path>.tmp``, fsync, rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "value"):  # enums (peft's TaskType)
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def write_rank_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors to ``<path>.part``, fsync, rename: a reader never sees half a file."""
    part = path.with_name(path.name + ".part")
    save_file(tensors, str(part), metadata={"format": "pt"})
    fsync_path(part)
    os.replace(part, path)


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at ``name`` atomically (tmp file, fsync, replace, fsync dir)."""
    tmp = root / "latest.tmp"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / "latest")
    fsync_path(root)


def publish(root: Path, tmp: Path, final: Path) -> None:
    """Make the complete directory ``tmp`` the checkpoint ``final``: fsync it, move an older
    ``final`` aside, rename, fsync the root, point ``latest`` at it, then delete the old one.
    A crash leaves a complete checkpoint under the final name or none there (for an instant
    while an older one of the same step is swapped out; earlier steps stay), never a torn one."""
    fsync_path(tmp)
    old = root / f"{final.name}.replaced"
    if final.exists():  # a step written again (after a resume, or a torn rescue target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(root)
    write_latest(root, final.name)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(d: Path, aside: Path) -> None:
    """Rename first so a half-deleted directory is never mistaken for a checkpoint."""
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(d, aside)
    shutil.rmtree(aside)
