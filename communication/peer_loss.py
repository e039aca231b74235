"""The first peer of a generation found gone, and the event that fails every collective in
flight with its name (one lost peer ends the generation: nothing waits out its deadline)."""

from __future__ import annotations

import asyncio
import logging

from communication.collectives import CollectiveError, Key

log = logging.getLogger(__name__)


class PeerLoss:
    """Which peer (rank, address) was found gone first; loop thread only."""

    def __init__(self, rank: int, peers: list[str]) -> None:
        self.rank = rank
        self.peers = peers
        self.lost: tuple[int, str] | None = None
        self._event: asyncio.Event | None = None  # created on the loop, on first use

    def _flag(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def mark(self, rank: int) -> None:
        """Remember the first peer found gone and wake every collective in flight."""
        if self.lost is None:
            self.lost = (rank, self.peers[rank])
            log.warning("rank %d: peer rank %d at %s is gone", self.rank, rank, self.peers[rank])
        self._flag().set()

    async def raise_when_lost(self, key: Key) -> None:
        """Wait until a peer is marked gone, then fail naming it and ``key``."""
        await self._flag().wait()
        rank, address = self.lost
        raise CollectiveError(f"{key} on rank {self.rank}: peer rank {rank} at {address} is gone",
                              rank=rank, address=address)
