"""How the engine shards: the transport deadline, compute dtype, device and prefetching."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardConfig:
    """How to shard: transport deadline, compute dtype, device, prefetching."""

    generation: int = 0
    timeout: float = 120.0
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    prefetch: bool = True
