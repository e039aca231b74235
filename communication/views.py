"""What a progress reporter reads off a rank's gRPC collectives from another thread: the
oldest collective in flight with the ranks that have not sent (waiting.py), and each peer's
round trip and send rate (links.py). Read on the transport's loop, with a short deadline."""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout

from communication.links import PING_TIMEOUT_S, Link, LinkMeter
from communication.waiting import InFlight, Waiting

log = logging.getLogger(__name__)

LOOK_TIMEOUT = 0.25  # waiting() and links() read the loop's state; a busy loop answers None


class ProgressViews:
    """Mixed into GrpcCollectives, which has ``transport``, ``peers``, ``rank`` and
    ``generation``; it records collectives in ``_flight`` and sends through ``_links``."""

    def _start_views(self, rank: int, peers: list[str]) -> None:
        self._flight = InFlight()
        self._links = LinkMeter(rank, peers, clock=time.monotonic)

    def waiting(self) -> Waiting | None:
        """The oldest collective in flight on this rank, with the ranks that have not sent to
        it (any thread; None also when the loop does not answer within LOOK_TIMEOUT)."""
        async def look():
            return self._flight.oldest(self.transport.accumulator, time.monotonic())
        return self._look(look(), "waiting")

    def links(self) -> list[Link]:
        """Each peer's round trip and send rate (links.py), and a Ping round started in the
        background if none ran for a second (any thread; [] if the loop does not answer)."""
        async def look():
            self._links.probe(lambda r: self.transport.client(self.peers[r]).ping(
                self.generation, self.rank, timeout=PING_TIMEOUT_S))
            return self._links.look()
        return self._look(look(), "links") or []

    def _look(self, coro, what: str):
        try:
            return self.transport.call(coro, timeout=LOOK_TIMEOUT)
        except (FutureTimeout, RuntimeError) as exc:  # a busy or stopped loop: no answer now
            log.debug("rank %d: %s not read: %r", self.rank, what, exc)
            return None
