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

Everything here runs on the transport's event loop thread; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from communication.buffer_pool import BufferPool
from communication.slot import ContributionError, Expectation, Slot

log = logging.getLogger(__name__)

_FINISHED_MEMORY = 4096  # finished keys remembered so a late retry is acknowledged, not stuck


class Accumulator:
    """All open slots of one rank, keyed by key string; hands out slots to the peer server."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._slots: dict[str, Slot] = {}
        self._opening: dict[str, asyncio.Future] = {}
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
        waiter = self._opening.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(slot)
        return slot

    def finished(self, key: str) -> bool:
        """Whether key completed here recently (a late retry for it is a duplicate)."""
        return key in self._finished

    async def slot(self, key: str, timeout: float) -> Slot | None:
        """The slot for key, waiting until the local rank opens it; None if it finished."""
        if key in self._slots:
            return self._slots[key]
        if key in self._finished:
            return None
        waiter = self._opening.get(key)
        if waiter is None:
            waiter = self._opening[key] = self._loop.create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            if self._opening.get(key) is waiter:
                del self._opening[key]
            raise

    def close(self, key: str, *, finished: bool) -> None:
        """Drop the slot (its memory goes with it); remember finished keys for late retries."""
        self._slots.pop(key, None)
        if finished:
            self._finished[key] = None
            while len(self._finished) > _FINISHED_MEMORY:
                self._finished.popitem(last=False)

    def drop_generations_below(self, generation: int) -> None:
        """Fail and forget every slot of an older generation."""
        for key, slot in list(self._slots.items()):
            if slot.expectation.generation < generation:
                slot.fail(ContributionError(f"key {key}: generation {generation} superseded it"))
                del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)
