"""Buddy replicas: every rank's owned state also lives on rank r+1, so a lost worker's shard is
rebuilt from its buddy instead of rolling back to the last checkpoint (``--buddy true``).

[Note: buddy replicas]
A *snapshot* is what a rank's checkpoint rank file would hold at step count n (the owned fp32
master slices, the frozen slices unless LoRA, the optimizer state, the RNG state), packed into
one flat uint8 tensor. After step n (the trainer calls ``after_step`` once its eval is done) rank r packs
its snapshot, keeps it, and *shifts* it to rank (r+1) % N, receiving rank r-1's in turn: the
*buddy copy*. The shift overlaps the next step's forward and backward; that step *settles* it
(waits for it) just before its optimizer update, so an update never overwrites a state whose
replica has not landed. On a lost generation every survivor writes what it holds
(rescue.py) and the next generation publishes it as a normal ``step_<n>`` checkpoint.

Held per rank: its newest settled snapshot and the buddy copy of rank r-1 (two snapshot-sized
buffers); while a shift is in flight also the new snapshot and the incoming copy (four). A
snapshot is 4 bytes per owned trainable element per fp32 tensor (master plus optimizer slices:
3x for AdamW, 2x for SGD with momentum), plus the frozen slice and about 5 KB of RNG state.

Steps lost: none when the lost worker's last shift had landed (it dies anywhere after the next
step's settle, or late enough in the forward/backward that overlapped the shift); one when it
dies in the short window between its update and its shift landing.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from communication.codec import as_bytes
from communication.collectives import Collectives, Key, Phase, result
from worker.state.checkpoint import Checkpointed, rank_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The packed state of ``rank`` (of the generation that made it) after ``step`` steps."""

    step: int
    rank: int
    flat: torch.Tensor  # uint8, laid out as Buddy.layout says


@dataclass(frozen=True, slots=True)
class Mark:
    """The small replicated state that goes with an own snapshot, for a rescued manifest."""

    progress: dict  # TrainState.state_dict() at the snapshot's step
    scheduler: dict
    optimizer: dict  # ShardedState.optimizer_meta(): class, param groups (lr), state keys


class Buddy:
    """Snapshots this rank's state after every step and keeps rank r-1's replica."""

    def __init__(self, states: Checkpointed, collectives: Collectives, *, timeout: float) -> None:
        self.states = states
        self.collectives = collectives
        self.rank, self.world_size = collectives.rank, collectives.world_size
        self.generation = states.shards.engine.generation
        self.timeout = timeout
        self.layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self.own: list[Snapshot] = []  # the settled one first, then the one in flight
        self.marks: dict[int, Mark] = {}
        self.held: Snapshot | None = None  # the settled buddy copy of rank r-1
        self.bytes_sent = 0
        self._pending: Future | None = None
        self._pending_key: Key | None = None
        self._spare: torch.Tensor | None = None  # a dropped snapshot's buffer, packed into next

    @property
    def source(self) -> int:
        """The rank whose replica this rank holds."""
        return (self.rank - 1) % self.world_size

    def after_step(self) -> None:
        """Pack this rank's state at the current step count and start shifting it to r+1."""
        self.settle()  # normally already done before this step's update
        tensors = rank_tensors(self.states)
        self.layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        parts = [as_bytes(t.contiguous()) for t in tensors.values()]
        size = sum(p.numel() for p in parts)
        spare, self._spare = self._spare, None
        flat = torch.empty(size, dtype=torch.uint8) if spare is None or spare.numel() != size \
            else spare
        torch.cat(parts, out=flat)
        progress = self.states.progress.state_dict()
        step = progress["step"]
        self.marks[step] = Mark(progress=progress, scheduler=self.states.scheduler.state_dict(),
                                optimizer=self.states.shards.optimizer_meta())
        key = Key(generation=self.generation, phase=Phase.BUDDY_SHIFT, step=step)
        self._pending, self._pending_key = self.collectives.shift(key, flat), key
        self.own.append(Snapshot(step=step, rank=self.rank, flat=flat))
        self.bytes_sent += flat.numel()

    def settle(self) -> None:
        """Wait for the shift in flight; then drop the snapshots it supersedes."""
        if self._pending is None:
            return
        received = result(self._pending, key=self._pending_key, rank=self.rank,
                          timeout=self.timeout)
        self._pending = None
        latest = self.own[-1]
        if len(self.own) > 1:  # the shift that carried it has finished: reuse the buffer
            self._spare = self.own[0].flat
        self.own = [latest]
        self.marks = {latest.step: self.marks[latest.step]}
        self.held = Snapshot(step=latest.step, rank=self.source, flat=received)

    def rescuable(self) -> tuple[list[Snapshot], list[Snapshot]]:
        """(own snapshots, buddy copies) complete now; a shift that finished unsettled counts."""
        held = [self.held] if self.held is not None else []
        fut = self._pending
        if fut is not None and fut.done() and fut.exception() is None:
            held.append(Snapshot(step=self.own[-1].step, rank=self.source, flat=fut.result()))
        return list(self.own), held

    def unpack(self, snap: Snapshot) -> dict[str, torch.Tensor]:
        """The named tensors of a snapshot (every rank's has the same layout)."""
        out, pos = {}, 0
        for name, dtype, shape in self.layout:
            n = dtype.itemsize * _numel(shape)
            out[name] = snap.flat[pos:pos + n].clone().view(dtype).reshape(shape)
            pos += n
        if pos != snap.flat.numel():
            raise ValueError(f"rank {self.rank}: snapshot of rank {snap.rank} at step {snap.step} "
                             f"has {snap.flat.numel()} bytes, the layout expects {pos}")
        return out

    def held_bytes(self) -> int:
        """Bytes of snapshots this rank holds now: own, buddy copy, and the one arriving."""
        n = sum(s.flat.numel() for s in self.own)
        n += self.held.flat.numel() if self.held is not None else 0
        return n + (self.own[-1].flat.numel() if self._pending is not None else 0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
