"""Where contributions to a collective land on the receiving rank: the gradient accumulator.

[Note: slots]
A *slot* is one collective on one rank, named by its key string (``str(Key)``). The local call
opens it with an ``Expectation``: how many contributions (world size), their shape and dtype,
the generation, and whether they are summed (reduce-scatter, all-reduce) or concatenated
(all-gather; barrier is a concat of empty tensors). Each sender's contribution is stored once:
a retry of a stored one is acknowledged and dropped. A sum folds contributions **in rank order**
in float32 as the prefix 0..k becomes complete, so the result never depends on arrival order;
a concat writes each sender's bytes straight into its rows of the preallocated output. A slot
with a ``source`` rank (a shift) is a concat of exactly one contribution, from that rank.
The waiter is woken by an asyncio future once every sender has arrived; the slot is removed
when its result is taken. A contribution that disagrees with the expectation raises
``ContributionError`` (the server maps it to INVALID_ARGUMENT) and changes nothing.
A contribution pushed in byte ranges is received through an ``Incoming`` (intake.py).

A push may arrive before the local rank opens its key; it waits for the opening with a
deadline. Every way such a wait ends removes it: the key opened, the deadline, the call
cancelled (its peer gave up), or its generation superseded, which fails it at once.

Everything here runs on the transport's event loop thread; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from communication.buffer_pool import BufferPool
from communication.slot import ContributionError, Expectation, Slot

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

_FINISHED_MEMORY = 4096  # finished keys remembered so a late retry is acknowledged, not stuck


class _Opening:
    """Pushes waiting for the local rank to open one key: the future they share, the
    generation the first of them announced, and how many are waiting."""

    __slots__ = ("future", "generation", "waiters")

    def __init__(self, future: asyncio.Future, generation: int | None):
        self.future = future
        self.generation = generation
        self.waiters = 0


class Accumulator:
    """All open slots of one rank, keyed by key string; hands out slots to the peer server."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._slots: dict[str, Slot] = {}
        self._opening: dict[str, _Opening] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.pool = BufferPool()

    def open(self, expectation: Expectation) -> Slot:
        """Create the slot for a local call; ValueError if the key is already in flight."""
        key = expectation.key
        if key in self._slots:
            raise ValueError(f"key {key} is already in flight on this rank")
        self._finished.pop(key, None)
        slot = Slot(expectation, self._loop, self.pool)
        self._slots[key] = slot
        opening = self._opening.pop(key, None)
        if opening is not None and not opening.future.done():
            opening.future.set_result(slot)
        return slot

    def peek(self, key: str) -> Slot | None:
        """The open slot for key, if the local rank opened it (no waiting)."""
        return self._slots.get(key)

    def finished(self, key: str) -> bool:
        """Whether key completed here recently (a late retry for it is a duplicate)."""
        return key in self._finished

    async def slot(self, key: str, timeout: float, *, generation: int | None = None
                   ) -> Slot | None:
        """The slot for key, waiting until the local rank opens it; None if it finished.
        TimeoutError after ``timeout``; ContributionError if ``generation`` is superseded
        meanwhile. The wait is forgotten however it ends (cancellation included)."""
        if key in self._slots:
            return self._slots[key]
        if key in self._finished:
            return None
        opening = self._opening.get(key)
        if opening is None:
            opening = self._opening[key] = _Opening(self._loop.create_future(), generation)
        opening.waiters += 1
        try:
            return await asyncio.wait_for(asyncio.shield(opening.future), timeout)
        finally:
            opening.waiters -= 1
            if opening.waiters == 0 and self._opening.get(key) is opening:
                del self._opening[key]

    def waiting(self) -> int:
        """How many keys pushes are waiting for (0 once every wait has ended)."""
        return len(self._opening)

    def close(self, key: str, *, finished: bool) -> None:
        """Drop the slot (its memory goes with it); remember finished keys for late retries."""
        self._slots.pop(key, None)
        if finished:
            self._finished[key] = None
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)

    def drop_generations_below(self, generation: int) -> None:
        """Fail and forget every slot of an older generation, and every push still waiting
        for a key of one (it would only hold its bytes until its deadline)."""
        for key, slot in list(self._slots.items()):
            if slot.expectation.generation < generation:
                slot.fail(ContributionError(f"key {key}: generation {generation} superseded it"))
                del self._slots[key]
        for key, opening in list(self._opening.items()):
            if opening.generation is not None and opening.generation < generation:
                del self._opening[key]
                if not opening.future.done():
                    opening.future.set_exception(ContributionError(
                        f"key {key}: generation expected {generation}, actual "
                        f"{opening.generation} (superseded while waiting for the key)"))

    def __len__(self) -> int:
        return len(self._slots)
