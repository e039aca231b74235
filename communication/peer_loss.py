"""The first peer failure of a generation, and the event that fails every collective in flight
and every later one with its name (one lost peer ends the generation: nothing waits out its
deadline). A failure is a peer found gone, or a peer refusing a contribution whose collective
had already completed here (its acknowledgement arrives after the result; see
grpc_collectives.py)."""

from __future__ import annotations

import asyncio
import logging

from communication.collectives import CollectiveError, Key

log = logging.getLogger(__name__)


class PeerLoss:
    """Which peer (rank, address) failed first, and why; loop thread only."""

    def __init__(self, rank: int, peers: list[str]) -> None:
        self.rank = rank
        self.peers = peers
        self.lost: tuple[int, str] | None = None
        self.reason: str | None = None
        self._event: asyncio.Event | None = None  # created on the loop, on first use

    def _flag(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def mark(self, rank: int, reason: str | None = None) -> None:
        """Remember the first peer found gone (``reason``: what it did instead, naming the key)
        and wake every collective in flight."""
        if self.lost is None:
            self.lost = (rank, self.peers[rank])
            self.reason = reason
            log.warning("rank %d: peer rank %d at %s %s", self.rank, rank, self.peers[rank],
                        reason or "is gone")
        self._flag().set()

    async def raise_when_lost(self, key: Key) -> None:
        """Wait until a peer is marked, then fail naming it and ``key``."""
        await self._flag().wait()
        rank, address = self.lost
        what = self.reason or f"peer rank {rank} at {address} is gone"
        raise CollectiveError(f"{key} on rank {self.rank}: {what}", rank=rank, address=address)
