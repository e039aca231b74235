"""Ranged reads of a checkpoint's rank files: only the bytes a rank needs, at any world size.

Because slots do not depend on the world size, rank ``r`` of any ``M`` finds its range
``[r*S_M, (r+1)*S_M)`` of each region in whichever saved files cover it.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from worker.state.catalog import CheckpointError


class RankFiles:
    """Ranged reads of one region from the rank files that hold it (only the bytes needed)."""

    def __init__(self, path: Path, world_size: int):
        self.dir = path
        self.world_size = world_size
        self._stack = ExitStack()
        self._open: dict[int, object] = {}

    def __enter__(self) -> RankFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def path(self, rank: int) -> str:
        return str(self.dir / f"rank_{rank}.safetensors")

    def _handle(self, rank: int):
        if rank not in self._open:
            self._open[rank] = self._stack.enter_context(safe_open(self.path(rank), "pt"))
        return self._open[rank]

    def _slice(self, rank: int, name: str, shard: int):
        fh = self._handle(rank)
        if name not in fh.keys():
            raise CheckpointError(f"{self.path(rank)}: no tensor {name!r}")
        sl = fh.get_slice(name)
        if list(sl.get_shape()) != [shard]:
            raise CheckpointError(f"{self.path(rank)}: {name!r} has shape {sl.get_shape()}, "
                                  f"expected [{shard}] (saved world size {self.world_size})")
        return sl

    def read(self, name: str, shard: int, start: int, stop: int, numel: int,
             dtype: torch.dtype) -> torch.Tensor:
        """Elements ``[start, stop)`` of a region of ``numel`` real elements saved as shards of
        ``shard``; elements past ``numel`` (padding) are zero."""
        out = torch.zeros(stop - start, dtype=dtype)
        pos, end = start, min(stop, numel)
        while pos < end:
            rank = pos // shard
            upto = min(end, (rank + 1) * shard)
            piece = self._slice(rank, name, shard)[pos - rank * shard : upto - rank * shard]
            out[pos - start : upto - start].copy_(piece)
            pos = upto
        return out

    def whole(self, rank: int, name: str) -> torch.Tensor | None:
        """Tensor ``name`` of saved rank ``rank`` as stored, or None when that file has none."""
        fh = self._handle(rank)
        return fh.get_tensor(name) if name in fh.keys() else None

    def names(self, rank: int) -> list[str]:
        """Every tensor name in saved rank ``rank``'s file."""
        return list(self._handle(rank).keys())

    def scalar(self, name: str) -> torch.Tensor:
        """A value every rank saved alike (the optimizer's step count): rank 0's copy."""
        fh = self._handle(0)
        if name not in fh.keys():
            raise CheckpointError(f"{self.path(0)}: no tensor {name!r}")
        return fh.get_tensor(name)
