"""How the engine shards and what travels: deadline, compute dtype, device, and the traffic
policy (prefetch depth, resharding after forward, replicated frozen weights, error feedback)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardConfig:
    """How to shard; every field's default is the engine's original behaviour.

    - ``prefetch``/``prefetch_depth``: while a unit computes, gather the next ``prefetch_depth``
      units (forward) or previous ones (backward); more hides more round trips, holds more.
    - ``reshard_after_forward``: False keeps a unit gathered from its forward to its backward
      (FSDP2's name): no backward all-gather, every unit alive at the end of forward.
    - ``replicate_frozen``: frozen parameters live whole on every rank and never travel.
    - ``error_feedback``: keep per unit what a lossy gradient codec lost and send it with the
      next gradient (one fp32 copy of the unit's trainable elements per rank, on CPU).
    - ``persist_threshold``: parameters with fewer elements stay whole on every rank and their
      gradients ride in the step's one all-reduce (0: everything is sharded).
    """

    generation: int = 0
    timeout: float = 120.0
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    prefetch: bool = True
    prefetch_depth: int = 1
    reshard_after_forward: bool = True
    replicate_frozen: bool = False
    error_feedback: bool = False
    persist_threshold: int = 0

    def __post_init__(self) -> None:
        if self.persist_threshold < 0:
            raise ValueError(f"persist_threshold must be >= 0, got {self.persist_threshold}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")

    @property
    def depth(self) -> int:
        """Units gathered ahead of the one that runs (0: no prefetch)."""
        return self.prefetch_depth if self.prefetch else 0
