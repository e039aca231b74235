"""What the peer server keeps while contributions come in: one contribution's byte ranges
(``Incoming``: it counts once its ranges, which may not overlap and share one codec, cover
every byte) and each sender's pushes in progress against per-sender caps (``SenderLedger``;
peer_server.py's note on bounds). Loop thread only."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from communication.framing import Undecodable
from communication.slot import ContributionError

if TYPE_CHECKING:
    from communication.proto import zerop2p_pb2 as pb

log = logging.getLogger(__name__)


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
