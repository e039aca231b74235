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
A contribution pushed in byte ranges is received through an ``Incoming``: it counts once its
ranges, which may not overlap and share one codec, cover every byte. ``SenderLedger`` counts
each sender's pushes in progress against per-sender caps (peer_server.py's note on bounds).

A push may arrive before the local rank opens its key; it waits for the opening with a
deadline. Every way such a wait ends removes it: the key opened, the deadline, the call
cancelled (its peer gave up), or its generation superseded, which fails it at once.

Everything here runs on the transport's event loop thread; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from communication.buffer_pool import BufferPool
from communication.framing import Undecodable
from communication.slot import ContributionError, Expectation, Slot

if TYPE_CHECKING:
    from communication.proto import zerop2p_pb2 as pb

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


class Incoming:
    """Receive state of one origin's contribution inside a slot: its codec (fixed by its first
    range), where its encoded bytes go, and its byte ranges (offset -> length) that are in
    (``done``) or on their way (``busy``). Ranges never overlap (``claim``), so the
    contribution is whole exactly when ``done`` adds up to ``total``."""

    __slots__ = ("codec", "total", "wire", "done", "busy")

    def __init__(self, codec: str, total: int, wire: torch.Tensor):
        self.codec = codec
        self.total = total
        self.wire = wire  # uint8 destination of the encoded bytes
        self.done: dict[int, int] = {}
        self.busy: dict[int, int] = {}

    def claim(self, h: pb.TensorHeader) -> None:
        """Reserve h's byte range for one call; ContributionError naming key, origin and range
        if it changes the codec, is empty or out of bounds, or overlaps or repeats another."""
        a, b = h.offset, h.offset + h.total_bytes
        where = f"key {h.key} sender {h.sender} origin {h.origin}: byte range [{a}, {b})"
        if h.codec != self.codec:
            raise ContributionError(f"{where}: codec expected {self.codec} (the contribution's "
                                    f"first range), actual {h.codec}")
        if a < 0 or b > self.total or (a == b and self.total):
            raise ContributionError(f"{where} empty or outside the expected {self.total} bytes")
        for ranges, state in ((self.done, "already received"), (self.busy, "being received")):
            for o, n in ranges.items():
                if a < o + n and o < b:
                    raise ContributionError(f"{where} overlaps [{o}, {o + n}), {state}")
        self.busy[a] = h.total_bytes

    async def write(self, h: pb.TensorHeader, data_frames) -> int:
        """Copy the data frames (framing.py's) into h's claimed range; the byte count.
        ContributionError naming key and sender unless exactly h.total_bytes arrive."""
        who = f"key {h.key} sender {h.sender}"
        dest = memoryview(self.wire[h.offset:h.offset + h.total_bytes].numpy())
        pos = 0
        async for data in data_frames:
            if isinstance(data, Undecodable):
                raise ContributionError(f"{who}: {data.reason}")
            if not isinstance(data, memoryview):
                raise ContributionError(f"{who}: a second header")
            end = pos + len(data)
            if end > h.total_bytes:
                raise ContributionError(f"{who}: more than the announced {h.total_bytes} bytes")
            dest[pos:end] = data
            pos = end
        if pos != h.total_bytes:
            raise ContributionError(f"{who}: expected {h.total_bytes} bytes, actual {pos}")
        return pos

    def finish(self, offset: int) -> bool:
        """The claimed range at offset is in; whether the contribution is now whole."""
        self.done[offset] = self.busy.pop(offset)
        return sum(self.done.values()) == self.total

    def release(self, offset: int) -> bool:
        """This call's claimed range at offset will not arrive; whether ``idle`` now."""
        del self.busy[offset]
        return self.idle()

    def idle(self) -> bool:
        """Nothing of the contribution is in or on its way."""
        return not self.done and not self.busy


class CapReached(Exception):
    """A sender over one of its caps; the message names the cap, the sender and the key."""


class SenderLedger:
    """Pushes in progress (waiting for their key or receiving) and the bytes they announced,
    per sender rank, held against two caps so that no one peer can fill this rank."""

    def __init__(self, *, open_calls: int, in_flight_bytes: int):
        self.open_calls, self.in_flight_bytes = open_calls, in_flight_bytes
        self.calls: Counter[int] = Counter()
        self.bytes: Counter[int] = Counter()

    def hold(self, sender: int, nbytes: int, *, key: str):
        """A context that counts one push of ``sender`` announcing nbytes while it lasts;
        CapReached (now, not on entry) if either cap would be passed."""
        who = f"key {key} sender {sender}"
        if self.calls[sender] >= self.open_calls:
            raise CapReached(f"{who}: cap of {self.open_calls} open contributions per sender "
                             f"reached")
        if self.bytes[sender] + nbytes > self.in_flight_bytes:
            raise CapReached(f"{who}: {nbytes} more bytes would pass the cap of "
                             f"{self.in_flight_bytes} in-flight bytes per sender "
                             f"({self.bytes[sender]} in flight)")
        return self._held(sender, nbytes)

    @contextmanager
    def _held(self, sender: int, nbytes: int) -> Iterator[None]:
        self.calls[sender] += 1
        self.bytes[sender] += nbytes
        try:
            yield
        finally:
            self.calls[sender] -= 1
            self.bytes[sender] -= nbytes
            if not self.calls[sender]:
                del self.calls[sender], self.bytes[sender]
