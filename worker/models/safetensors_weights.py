"""A ``from_pretrained`` directory's tensors, read one at a time: ``model.safetensors`` or the
shards a ``model.safetensors.index.json`` names. Nothing reads a whole file: ``safe_open``
maps the file and copies out only the tensor asked for, so filling a model unit by unit holds
one unit's tensors at a time (meta.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsWeights:
    """Tensor names to files of one directory; ``read`` copies one tensor out."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open  # lazy: safetensors

        self.path = Path(path)
        self._open = safe_open
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index}: not a safetensors index ({exc})") from None
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            with safe_open(str(self.path / SINGLE), "pt") as f:
                self.files = {name: self.path / SINGLE for name in f.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{self.path} has neither {SINGLE} nor {INDEX}")
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are absent: {missing[:3]}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name``, copied out of its file."""
        with self._open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)
