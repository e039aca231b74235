"""The one interface the ZeRO-3 engine uses to move tensors; transports plug in behind it.

[Note: collective semantics]
Every call is asynchronous and returns a ``concurrent.futures.Future`` so the training thread
can overlap compute with communication and wait only when it needs the data.

- ``all_gather(key, shard)``: every rank passes a 1-D shard of the same length ``S``; the result
  is the 1-D concatenation of all shards in rank order (length ``world_size * S``).
- ``reduce_scatter(key, full, feedback=None)``: every rank passes a 1-D tensor of length
  ``world_size * S``; rank ``r`` receives ``sum over ranks of full[r*S:(r+1)*S]``. A transport
  that sends gradients lossily adds ``feedback`` to what it sends and leaves in it what was
  lost (error feedback); a lossless one leaves it untouched.
- ``all_reduce(key, value)``: every rank receives the element-wise sum of all ranks' ``value``,
  always exactly (never compressed): it carries norms, losses and counts.
- ``barrier(key)``: completes once every rank has entered the barrier with the same key.
- ``shift(key, tensor)``: rank ``r`` sends ``tensor`` to rank ``(r+1) % W`` and receives the one
  of rank ``(r-1) % W`` (every rank passes the same shape and dtype). It moves bytes, never
  compressed: it carries master copies (the buddy replicas of worker/state/buddy.py).

Sums are accumulated in float32 for low-precision inputs and returned in the input's dtype, on
the input's device. Contributions are summed in rank order once all have arrived (never in
arrival order), so results are bit-identical from run to run. A contribution that arrives twice
is counted once. A collective that cannot finish within its deadline fails its future with
``CollectiveError`` naming the peer rank and address that did not answer.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)


class Phase(str, enum.Enum):
    """What a collective is for; part of its Key, so an error names the real thing."""

    GATHER_FORWARD = "gather_fwd"  # a unit's parameters, before its forward
    GATHER_BACKWARD = "gather_bwd"  # the same again, before its backward
    GATHER_WEIGHTS = "gather_weights"  # full weights assembled for export or the final output
    REDUCE_SCATTER = "reduce_scatter"  # a unit's gradient, summed into each owner's slice
    ALL_REDUCE = "all_reduce"  # a small fp32 vector (grad norm, loss, tokens, eval totals)
    BARRIER = "barrier"  # no data: every rank reached the same point
    CHECKPOINT_BARRIER = "checkpoint_barrier"  # index 0: rank files written; 1: published
    BUDDY_SHIFT = "buddy_shift"  # a rank's snapshot moving to rank r+1 after a step
    RESCUE_BARRIER = "rescue_barrier"  # a new generation publishing buddy copies (index 0, 1)
    # Between islands (worker/islands/outer.py), on the outer transport; generation = round.
    OUTER_WEIGHT = "outer_weight"  # each island's weight in the average (tokens, or 1)
    OUTER_REDUCE = "outer_reduce"  # pseudo-gradients, summed into each owner's part
    OUTER_GATHER = "outer_gather"  # the summed parts, to every island
    OUTER_STATE = "outer_state"  # the global copy and outer momentum, to islands that join


_PHASE_WORDS = {
    Phase.GATHER_FORWARD: "forward all-gather", Phase.GATHER_BACKWARD: "backward all-gather",
    Phase.GATHER_WEIGHTS: "weights all-gather", Phase.REDUCE_SCATTER: "reduce-scatter",
    Phase.ALL_REDUCE: "all-reduce", Phase.BARRIER: "barrier",
    Phase.CHECKPOINT_BARRIER: "checkpoint barrier", Phase.BUDDY_SHIFT: "buddy shift",
    Phase.RESCUE_BARRIER: "rescue barrier", Phase.OUTER_WEIGHT: "outer weight all-reduce",
    Phase.OUTER_REDUCE: "outer reduce-scatter", Phase.OUTER_GATHER: "outer all-gather",
    Phase.OUTER_STATE: "outer state broadcast",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """Names one collective uniquely inside a cluster: no two in flight may share a Key.

    Only the fields that mean something for the phase are set: ``unit`` and ``micro_batch``
    for a unit's gathers and reduce-scatters, ``index`` for the n-th collective of a phase in
    one step (all-reduces, checkpoint barriers), ``step`` for everything that belongs to a
    step (a rescue does not). ``str(key)`` is its identity on the wire."""

    generation: int
    phase: Phase
    step: int | None = None
    unit: int | None = None
    micro_batch: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        parts = [f"g{self.generation}"]
        if self.step is not None:
            parts.append(f"s{self.step}")
        if self.unit is not None:
            parts.append(f"u{self.unit}")
        if self.micro_batch is not None:
            parts.append(f"m{self.micro_batch}")
        parts.append(self.phase.value)
        if self.index is not None:
            parts.append(str(self.index))
        return "/".join(parts)

    def describe(self) -> str:
        """The key in words, e.g. 'reduce-scatter of unit 7, micro-batch 0, step 41 (generation 3)'."""
        what = [f"unit {self.unit}"] if self.unit is not None else []
        what += [f"micro-batch {self.micro_batch}"] if self.micro_batch is not None else []
        what += [f"step {self.step}"] if self.step is not None else []
        head = _PHASE_WORDS[self.phase] + (f" #{self.index}" if self.index is not None else "")
        return f"{head} of {', '.join(what)} (generation {self.generation})" if what else \
            f"{head} (generation {self.generation})"


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

    def reduce_scatter(self, key: Key, full: torch.Tensor, *,
                       feedback: torch.Tensor | None = None) -> Future[torch.Tensor]: ...

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
    first, naming the lost peer; this is the backstop. A watcher, if one is installed, hears of
    the wait meanwhile (see the note on watchers)."""
    try:
        return wait_result(fut, key=key, timeout=timeout)
    except FutureTimeout:
        raise CollectiveError(f"{key} on rank {rank}: no result within {timeout}s") from None


# [Note: watchers]
# ``result()`` is where every training-thread wait on a collective ends up. With a watcher
# installed (``install``) it waits in slices of ``watcher.every`` seconds: a result that arrives
# wakes it at once (the future's own condition), and each slice that passes without one calls
# ``watcher.notify(key, seconds waited)``. The worker's progress reporter is the watcher
# (worker/train/reporting.py): the trainer itself tells the coordinator, while blocked, what it
# waits for, so a rank that waits keeps reporting and one whose trainer hangs, or is stopped,
# falls silent. There is one watcher per process, not one per context: autograd runs backward
# hooks (the backward all-gathers) on its own device threads, and a worker has one trainer.

@dataclass(frozen=True, slots=True)
class Watcher:
    """Called every ``every`` seconds a wait on a collective's result lasts."""

    notify: Callable[[Key, float], None]
    every: float


_watcher: Watcher | None = None


def install(watcher: Watcher) -> Callable[[], None]:
    """Make ``watcher`` this process's; returns the call that puts the previous one back."""
    global _watcher
    previous, _watcher = _watcher, watcher

    def uninstall() -> None:
        global _watcher
        _watcher = previous

    return uninstall


def wait_result(fut: Future, *, key: Key, timeout: float) -> Any:
    """``fut.result(timeout)``, telling the watcher (if any) every ``every`` seconds meanwhile;
    ``concurrent.futures.TimeoutError`` at the deadline, as ``fut.result`` would."""
    watcher = _watcher
    if watcher is None or fut.done():
        return fut.result(timeout=timeout)
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            return fut.result(timeout=max(min(watcher.every, deadline - time.monotonic()), 0.0))
        except FutureTimeout:
            if time.monotonic() >= deadline:
                raise
        try:
            watcher.notify(key, time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 - a report must never break a collective
            log.warning("waiting on %s: the watcher failed: %s", key, exc)
