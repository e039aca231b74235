"""The one interface the ZeRO-3 engine uses to move tensors; transports plug in behind it.

[Note: collective semantics]
Every call is asynchronous and returns a ``concurrent.futures.Future`` so the training thread
can overlap compute with communication and wait only when it needs the data.

- ``all_gather(key, shard)``: every rank passes a 1-D shard of the same length ``S``; the result
  is the 1-D concatenation of all shards in rank order (length ``world_size * S``).
- ``reduce_scatter(key, full)``: every rank passes a 1-D tensor of length ``world_size * S``; rank
  ``r`` receives ``sum over ranks of full[r*S:(r+1)*S]``.
- ``all_reduce(key, value)``: every rank receives the element-wise sum of all ranks' ``value``.
- ``barrier(key)``: completes once every rank has entered the barrier with the same key.
- ``shift(key, tensor)``: rank ``r`` sends ``tensor`` to rank ``(r+1) % W`` and receives the one
  of rank ``(r-1) % W`` (every rank passes the same shape and dtype). It moves bytes, never
  compressed: it carries master copies (the buddy replicas of worker/buddy.py).

Sums are accumulated in float32 for low-precision inputs and returned in the input's dtype, on
the input's device. Contributions are summed in rank order once all have arrived (never in
arrival order), so results are bit-identical from run to run. A contribution that arrives twice
is counted once. A collective that cannot finish within its deadline fails its future with
``CollectiveError`` naming the peer rank and address that did not answer.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class Phase(str, enum.Enum):
    """Which part of a step a collective belongs to; part of its Key."""

    GATHER_FORWARD = "gather_fwd"
    GATHER_BACKWARD = "gather_bwd"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_REDUCE = "all_reduce"
    BARRIER = "barrier"
    BUDDY = "buddy"  # the buddy replica's shift after a step, and the rescue barriers


@dataclass(frozen=True, slots=True)
class Key:
    """Names one collective uniquely inside a cluster: no two in flight may share a Key."""

    generation: int
    step: int
    unit: int
    micro_batch: int
    phase: Phase

    def __str__(self) -> str:
        return (
            f"g{self.generation}/s{self.step}/u{self.unit}/m{self.micro_batch}/{self.phase.value}"
        )


class CollectiveError(RuntimeError):
    """A collective failed: a peer is gone, timed out, or sent something inconsistent."""

    def __init__(self, message: str, *, rank: int | None = None, address: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.address = address


@runtime_checkable
class Collectives(Protocol):
    """The transport seam of DESIGN.md; see the module note for exact semantics."""

    rank: int
    world_size: int

    def all_gather(self, key: Key, shard: torch.Tensor) -> Future[torch.Tensor]: ...

    def reduce_scatter(self, key: Key, full: torch.Tensor) -> Future[torch.Tensor]: ...

    def all_reduce(self, key: Key, value: torch.Tensor) -> Future[torch.Tensor]: ...

    def barrier(self, key: Key) -> Future[None]: ...

    def shift(self, key: Key, tensor: torch.Tensor) -> Future[torch.Tensor]: ...

    def close(self) -> None: ...


def completed(value: object) -> Future:
    """A future that is already done; used by world-size-1 shortcuts."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


def result(fut: Future, *, key: Key, rank: int, timeout: float):
    """``fut``'s result; past ``timeout`` a CollectiveError naming the key and our rank (a bare
    ``concurrent.futures.TimeoutError`` says neither). The transports' own deadlines usually fire
    first, naming the lost peer; this is the backstop."""
    try:
        return fut.result(timeout=timeout)
    except FutureTimeout:
        raise CollectiveError(f"{key} on rank {rank}: no result within {timeout}s") from None
