"""This rank's links to its peers, measured by the transport itself: the round trip of the Ping
RPC, and the rate at which pushes to each peer went out (bytes over the time a push to that
peer was in flight: the union of the pushes' intervals, so parallel streams are not counted
twice). A push lasts until the peer acknowledges it, so a peer that opens its key late (it is
behind) lowers the rate too: it is what this rank gets, not the wire's capacity.

Everything here runs on the transport's loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # pings go out at most this often, however often the links are read
PING_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """One peer as this rank sees it: the last Ping's round trip (None: none answered yet, or
    the last one failed), the send rate since the previous look (None: nothing was sent), and
    every byte pushed to it so far."""

    rank: int
    address: str
    rtt_s: float | None
    send_bytes_per_s: float | None
    sent_bytes: int


class _Peer:
    __slots__ = ("sent", "active", "busy_since", "busy", "rtt", "seen_sent", "seen_busy")

    def __init__(self) -> None:
        self.sent = 0
        self.active = 0  # pushes in flight
        self.busy_since = 0.0
        self.busy = 0.0  # seconds with at least one push in flight, closed intervals
        self.rtt: float | None = None
        self.seen_sent = 0  # what the previous look saw
        self.seen_busy = 0.0


class LinkMeter:
    """Byte and time counters per peer rank, and the latest Ping round trips."""

    def __init__(self, rank: int, peers: list[str], clock: Callable[[], float]):
        self.rank = rank
        self.peers = peers
        self._clock = clock
        self._peers = [_Peer() for _ in peers]
        self._probe: asyncio.Task | None = None
        self._probed_at = float("-inf")

    def begin(self, dest: int) -> None:
        """A push to ``dest`` starts."""
        peer = self._peers[dest]
        if peer.active == 0:
            peer.busy_since = self._clock()
        peer.active += 1

    def end(self, dest: int, sent: int) -> None:
        """A push to ``dest`` ended, having delivered ``sent`` bytes (0 if it failed)."""
        peer = self._peers[dest]
        peer.active -= 1
        peer.sent += sent
        if peer.active == 0:
            peer.busy += self._clock() - peer.busy_since

    def look(self) -> list[Link]:
        """Every peer's link, with the rate since the previous look."""
        now, links = self._clock(), []
        for rank, peer in enumerate(self._peers):
            if rank == self.rank:
                continue
            busy = peer.busy + (now - peer.busy_since if peer.active else 0.0)
            sent, spent = peer.sent - peer.seen_sent, busy - peer.seen_busy
            peer.seen_sent, peer.seen_busy = peer.sent, busy
            links.append(Link(rank=rank, address=self.peers[rank], rtt_s=peer.rtt,
                              send_bytes_per_s=sent / spent if sent and spent > 0 else None,
                              sent_bytes=peer.sent))
        return links

    def probe(self, ping: Callable[[int], object]) -> None:
        """Ping every peer in the background, unless a round is under way or one started less
        than PROBE_EVERY_S ago; ``ping(rank)`` is the coroutine of one Ping."""
        now = self._clock()
        if (self._probe is not None and not self._probe.done()) or \
                now - self._probed_at < PROBE_EVERY_S:
            return
        self._probed_at = now
        self._probe = asyncio.get_running_loop().create_task(self._round(ping))

    async def _round(self, ping) -> None:
        ranks = [r for r in range(len(self.peers)) if r != self.rank]
        await asyncio.gather(*(self._one(r, ping) for r in ranks))

    async def _one(self, rank: int, ping) -> None:
        start = self._clock()
        try:
            await asyncio.wait_for(ping(rank), PING_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a failed ping is a measurement, not an error
            log.debug("ping of rank %d at %s failed: %s", rank, self.peers[rank], exc)
            self._peers[rank].rtt = None
            return
        self._peers[rank].rtt = self._clock() - start

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
