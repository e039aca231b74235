"""A bounded free-list of CPU receive buffers, reused by size and dtype."""

from __future__ import annotations

import torch


class BufferPool:
    """Reuses receive buffers of freed contributions: a fresh tensor costs a page fault per
    4 KiB on first write, which on these machines is as slow as the copy itself."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._bytes = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((numel, dtype))
        if free:
            t = free.pop()
            self._bytes -= t.nbytes
            return t
        return torch.empty(numel, dtype=dtype)

    def give(self, t: torch.Tensor) -> None:
        if self._bytes + t.nbytes > self.max_bytes:
            return
        self._free.setdefault((t.numel(), t.dtype), []).append(t)
        self._bytes += t.nbytes
