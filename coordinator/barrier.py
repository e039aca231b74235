"""The training-ready barrier: freezes alive workers into numbered generations; long-polls.

[Note: generations]
A generation is a frozen membership of one site: a number, and every member's rank and
address. At most one per site is active. It ends when a member dies, leaves or re-registers, or
when every member still alive has asked for a newer one (``after``): all of them saw it fail.
Then the next barrier call for that site that finds ``min_workers`` alive workers of the site
freezes them into a new generation. Sites never wait for each other here; the outer rounds
across sites are ``coordinator.islands``'.

Numbers never go back: they persist in SQLite, and a new generation is also numbered above
every ``after`` a worker has sent, so even a coordinator restarted on ``:memory:`` never
reuses a number that messages in flight may still carry. Numbers are shared by every site.

Numbers never pass ``MAX_GENERATION`` (2**53 - 1) either: forming one beyond is refused (409),
never wrapped. So that no caller can spend the numbers with one ``after``, an ``after`` lifts
the floor to ``FLOOR_CAP`` (2**52) at most; reaching the limit from there takes 2**52 more
generations.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.config import MAX_WAIT_S
from coordinator.fields import DEFAULT_SITE, MAX_GENERATION
from coordinator.models import PeerOut, ReadyResponse
from coordinator.rows import GenerationRow
from coordinator.service import Coordinator

log = logging.getLogger(__name__)

FLOOR_CAP = (MAX_GENERATION + 1) // 2  # the highest floor an ``after`` can set


class Barrier:
    """Answers ``GET /training/ready``; waiters sleep on the coordinator's change event."""

    def __init__(self, coordinator: Coordinator, *, max_wait: float = MAX_WAIT_S) -> None:
        self.coordinator = coordinator
        self.max_wait = max_wait
        self._abandoned: dict[int, set[str]] = {}  # generation -> members that asked for newer
        self._floor = 0  # the highest generation any worker of any site has told us it saw

    async def ready(self, min_workers: int, *, wait: float = 0.0, worker_id: str | None = None,
                    after: int | None = None, site: str = DEFAULT_SITE) -> ReadyResponse:
        """Evaluate ``site``'s barrier now and, until it is met or ``wait`` expires, at every
        change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), self.max_wait)
        while True:
            changed = self.coordinator.changed()
            answer = self._evaluate(min_workers, worker_id, after, site)
            remaining = deadline - loop.time()
            if answer.ready or remaining <= 0:
                return answer
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _evaluate(self, min_workers: int, worker_id: str | None, after: int | None,
                  site: str) -> ReadyResponse:
        coord = self.coordinator
        self._floor = max(self._floor, min(after or 0, FLOOR_CAP))
        gen = coord.store.current_generation(site)
        if gen is not None and after is not None and gen.generation <= after:
            gen = self._abandon(gen, worker_id)
        if gen is None:
            self._forget_ended()
            gen = coord.form_generation(min_workers, at_least=self._floor + 1, site=site)
        alive = coord.store.workers("alive", site=site)
        if gen is None or (after is not None and gen.generation <= after):
            return ReadyResponse(
                ready=False, active_workers=len(alive), min_workers=min_workers,
                generation=gen.generation if gen else None,
                workers=[PeerOut(worker_id=w.worker_id, ip_address=w.ip_address, port=w.port,
                                 rank=None) for w in alive])
        members = [PeerOut.model_validate(m) for m in gen.members]
        return ReadyResponse(ready=worker_id is None or gen.has(worker_id),
                             active_workers=len(alive), min_workers=min_workers,
                             generation=gen.generation, workers=members)

    def _abandon(self, gen: GenerationRow, worker_id: str | None) -> GenerationRow | None:
        """Note that a member wants a newer generation; end ``gen`` once every alive member
        does. Returns the generation still active, if any."""
        if worker_id is None or not gen.has(worker_id):
            return gen
        asked = self._abandoned.setdefault(gen.generation, set())
        asked.add(worker_id)
        alive = {w.worker_id for w in self.coordinator.store.workers("alive")}
        if not all(m.worker_id in asked for m in gen.members if m.worker_id in alive):
            return gen
        self._abandoned.pop(gen.generation, None)
        self.coordinator.end_generation(gen, "every live member asked for a new generation")
        return None

    def _forget_ended(self) -> None:
        """Drop the requests for newer generations kept for generations no longer active
        (other sites' active ones keep theirs)."""
        if self._abandoned:
            active = {g.generation for g in self.coordinator.store.active_generations()}
            self._abandoned = {g: s for g, s in self._abandoned.items() if g in active}
