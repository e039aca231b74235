"""One slot of the accumulator: what it expects (``Expectation``), how it combines (``Mode``),
and the ``Slot`` that stores each sender's contribution once and folds sums in rank order.
The vocabulary and the rules are in the note at the top of accumulator.py."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import torch

from communication.buffer_pool import BufferPool


class Mode(str, enum.Enum):
    """How a slot combines its contributions."""

    SUM = "sum"
    CONCAT = "concat"


class ContributionError(ValueError):
    """A contribution that disagrees with its slot; the slot is left untouched."""


class MissingContributions(TimeoutError):
    """The deadline passed before every sender arrived; ``missing`` lists their ranks."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True, kw_only=True, slots=True)
class Expectation:
    """What a slot accepts: one contribution per rank of this shape and dtype."""

    key: str
    generation: int
    world_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: Mode
    source: int | None = None  # set: a shift, one contribution from this rank only

    def __post_init__(self) -> None:
        if self.source is not None and self.mode is not Mode.CONCAT:
            raise ValueError(f"key {self.key}: a slot with a source rank (a shift) concatenates; "
                             f"mode {self.mode.value} was asked for")

    @property
    def senders(self) -> tuple[int, ...]:
        """The ranks whose contributions complete the slot."""
        return (self.source,) if self.source is not None else tuple(range(self.world_size))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Slot:
    """One collective's contributions on this rank."""

    def __init__(self, expectation: Expectation, loop: asyncio.AbstractEventLoop,
                 pool: BufferPool | None = None):
        self.expectation = expectation
        self._pool = pool or BufferPool(0)
        self._pooled: set[int] = set()  # senders whose part came from the pool
        self._arrived: set[int] = set()
        self._staged: dict[int, torch.Tensor] = {}
        self._parts: dict[int, torch.Tensor] = {}
        self._next = 0  # next rank to fold into the running sum
        self._acc: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        if expectation.mode is not Mode.SUM:
            self._out = torch.empty(len(expectation.senders) * expectation.numel,
                                    dtype=expectation.dtype)
        self._done: asyncio.Future = loop.create_future()
        self._loop = loop
        self._arrivals: dict[int, asyncio.Future] = {}

    # -- validation ------------------------------------------------------------------------

    def check(self, *, sender: int, generation: int, shape: tuple[int, ...],
              dtype: torch.dtype) -> None:
        """Raise ContributionError naming key, sender, expected and actual on any mismatch."""
        e = self.expectation
        where = f"key {e.key} sender {sender}"
        if not 0 <= sender < e.world_size:
            raise ContributionError(f"{where}: sender outside world of size {e.world_size}")
        if e.source is not None and sender != e.source:
            raise ContributionError(f"{where}: shift expects rank {e.source} only, actual "
                                    f"rank {sender}")
        if generation != e.generation:
            raise ContributionError(f"{where}: generation expected {e.generation}, "
                                    f"actual {generation}")
        if dtype != e.dtype:
            raise ContributionError(f"{where}: dtype expected {e.dtype}, actual {dtype}")
        if tuple(shape) != e.shape:
            raise ContributionError(f"{where}: shape expected {list(e.shape)}, "
                                    f"actual {list(shape)}")

    # -- receiving ---------------------------------------------------------------------------

    def has(self, sender: int) -> bool:
        """Whether sender's contribution is already stored (a retry must be dropped)."""
        return sender in self._arrived

    def buffer(self, sender: int) -> torch.Tensor:
        """The preallocated 1-D tensor that sender's decoded data is written into."""
        if self._out is not None:
            n = self.expectation.numel
            row = 0 if self.expectation.source is not None else sender
            return self._out[row * n:(row + 1) * n]
        staged = self._staged.get(sender)
        if staged is None:
            staged = self._pool.take(self.expectation.numel, self.expectation.dtype)
            self._staged[sender] = staged
            self._pooled.add(sender)
        return staged

    def commit(self, sender: int) -> bool:
        """Count sender's buffer as arrived; False (and no effect) if it already was."""
        if sender in self._arrived:
            return False
        self._arrived.add(sender)
        arrival = self._arrivals.get(sender)
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
        if self._out is None:
            self._parts[sender] = self._staged.pop(sender)
            self._fold()
        if len(self._arrived) == len(self.expectation.senders) and not self._done.done():
            self._done.set_result(None)
        return True

    def discard(self, sender: int) -> None:
        """Give back the staging buffer of a contribution whose receive was abandoned
        (cancelled or refused before any range of it was complete); a later push of it takes
        a fresh one. No effect once sender arrived."""
        if sender in self._arrived:
            return
        staged = self._staged.pop(sender, None)
        if staged is not None and sender in self._pooled:
            self._pooled.discard(sender)
            self._pool.give(staged)

    def put(self, sender: int, tensor: torch.Tensor) -> bool:
        """Store a whole contribution (the local rank's own), validating it first."""
        self.check(sender=sender, generation=self.expectation.generation,
                   shape=tuple(tensor.shape), dtype=tensor.dtype)
        if self.has(sender):
            return False
        if self._out is not None:
            self.buffer(sender).copy_(tensor.reshape(-1))
        else:
            # Held by reference: the caller must not modify its input until the future is done.
            self._staged[sender] = tensor.reshape(-1)
        return self.commit(sender)

    def _fold(self) -> None:
        """Add contributions 0, 1, 2, ... to the float32 sum as soon as the prefix is complete."""
        if self._acc is None:
            if 0 not in self._parts or (1 not in self._parts and self.expectation.world_size > 1):
                return
            first = self._parts.pop(0)
            second = self._parts.pop(1, None)
            if second is None:
                self._acc = first.to(torch.float32, copy=True)
            elif first.dtype == torch.float32:
                self._acc = torch.add(first, second)  # one pass, same bits as copy then add
            else:
                self._acc = first.to(torch.float32)
                self._acc.add_(second)
            self._recycle(0, first)
            if second is not None:
                self._recycle(1, second)
            self._next = 2 if second is not None else 1
        while self._next in self._parts:
            part = self._parts.pop(self._next)
            self._acc.add_(part)
            self._recycle(self._next, part)
            self._next += 1

    def _recycle(self, sender: int, part: torch.Tensor) -> None:
        if sender in self._pooled:
            self._pooled.discard(sender)
            self._pool.give(part)

    # -- completing --------------------------------------------------------------------------

    async def arrived(self, sender: int) -> None:
        """Wait until sender's contribution is stored (a ring forwards it on then)."""
        if sender in self._arrived:
            return
        arrival = self._arrivals.get(sender)
        if arrival is None:
            arrival = self._arrivals[sender] = self._loop.create_future()
        await asyncio.shield(arrival)

    def missing(self) -> list[int]:
        return [r for r in self.expectation.senders if r not in self._arrived]

    async def wait(self, timeout: float) -> None:
        """Wait until every sender arrived; MissingContributions names the rest at timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except asyncio.TimeoutError:
            missing = self.missing()
            raise MissingContributions(
                f"key {self.expectation.key}: no contribution from rank(s) {missing} within "
                f"{timeout:.1f}s", missing) from None

    def fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)

    def result(self) -> torch.Tensor:
        """The rank-order sum (in the expected dtype) or the concatenation in rank order."""
        if self.missing():
            raise RuntimeError(f"key {self.expectation.key}: result before rank(s) "
                               f"{self.missing()} arrived")
        if self.expectation.source is not None:
            return self._out.view(self.expectation.shape)
        if self._out is not None:
            return self._out
        assert self._acc is not None
        acc = self._acc.view(self.expectation.shape)
        return acc if self.expectation.dtype == torch.float32 else acc.to(self.expectation.dtype)
