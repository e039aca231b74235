"""Outer rounds across islands: which sites average together at round k (DiLoCo's outer step).

[Note: outer rounds]
Each site (island) trains in its own generation and, every H inner steps, posts round k. A site
has *arrived* at round k once any member of its active generation has posted k; the first post
fixes the generation and ``joining`` flag it is counted with. Round k is *decided* when
``islands`` distinct sites have arrived, or when ``quorum_timeout`` seconds have passed since
the first arrival still counted (each post applies its own two numbers; the first post that
finds its rule met decides). A decision is frozen and stored: every later post for round k,
from any rank of any site, gets the same answer, even from a site that is not in it (so it
learns that it was left out) and after a coordinator restart.

Only round ``last decided + 1`` is ever undecided, so the arrivals kept in memory are one per
site at most. A site whose generation ends while it is counted is dropped from them (its
workers rejoin in a new generation and post again); an arrival lost to a restart is recorded
again by the next post. A post waits on events (a new arrival or decision, a generation
ending) and on the quorum deadline, never in a sleep loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from coordinator.config import MAX_WAIT_S
from coordinator.models import IslandMember, IslandOut, RoundRequest, RoundResponse
from coordinator.rows import GenerationRow, IslandRow
from coordinator.service import Coordinator, Refusal

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Arrival:
    """A site counted at the round being decided; ``at`` is the loop time of its first post."""

    island: IslandRow
    at: float


class Islands:
    """Answers ``POST /islands/rounds/{round}``; one per app, used from its event loop."""

    def __init__(self, coordinator: Coordinator, *, max_wait: float = MAX_WAIT_S) -> None:
        self.coordinator = coordinator
        self.max_wait = max_wait
        self._pending = 0  # the round the arrivals below are for
        self._arrivals: dict[str, Arrival] = {}
        self._changed = asyncio.Event()
        self._answer: RoundResponse | None = None  # the newest decided round's, for its ranks

    async def post(self, number: int, request: RoundRequest) -> RoundResponse:
        """Count ``request``'s site at round ``number`` and, until the round is decided or
        ``request.wait`` expires, evaluate it again at every change and at its quorum
        deadline. Refusals: 404 unknown worker, 409 not a member of that generation or a
        round out of turn."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(request.wait, self.max_wait)
        while True:
            events = (self._changed, self.coordinator.changed())  # taken before evaluating
            answer = self._evaluate(number, request, loop.time())
            now = loop.time()
            if answer.decided or now >= deadline:
                return answer
            until = min(deadline, self._quorum_deadline(request))
            await _any(events, max(until - now, 0.0))

    def _evaluate(self, number: int, request: RoundRequest, now: float) -> RoundResponse:
        gen = self._membership(number, request)
        last = self.coordinator.store.last_round()
        if number <= last:
            return self._decided(number)
        self._drop_ended(number)
        # Before any decision the first post opens its own round: islands resumed from their
        # checkpoints on a new coordinator go on from the round they saved.
        expected = (self._pending if self._arrivals else number) if last == 0 else last + 1
        if number != expected:
            raise Refusal(409, f"round {number}: posted by {request.worker_id!r} of site "
                               f"{request.site!r}, but the next round to decide is {expected} "
                               f"(round {last} was the last decided)")
        if self._pending != number:
            self._pending, self._arrivals = number, {}
        if request.site not in self._arrivals:
            island = IslandRow(request.site, gen.generation, request.joining)
            self._arrivals[request.site] = Arrival(island, now)
            log.info("round %d: site %s arrived (generation %d%s); %d of %d islands", number,
                     request.site, gen.generation, ", joining" if request.joining else "",
                     len(self._arrivals), request.islands)
            self._notify()
        if len(self._arrivals) >= request.islands or now >= self._quorum_deadline(request):
            return self._decide(number, request)
        return RoundResponse(round=number, decided=False, islands=[
            self._island(a.island) for _, a in sorted(self._arrivals.items())])

    def _membership(self, number: int, request: RoundRequest) -> GenerationRow:
        """The requester's active generation; 404 if unknown, 409 unless it is a member of
        its site's active generation numbered ``request.generation``, whose members all have
        outer ports."""
        store, worker_id, site = self.coordinator.store, request.worker_id, request.site
        worker = store.worker(worker_id)
        if worker is None:
            raise Refusal(404, f"unknown worker {worker_id!r}: register first "
                               "(POST /workers/register)")
        if worker.site != site:
            raise Refusal(409, f"round {number}: worker {worker_id!r} is registered at site "
                               f"{worker.site!r}, not {site!r}")
        gen = store.current_generation(site)
        if gen is None or gen.generation != request.generation or not gen.has(worker_id):
            actual = "none" if gen is None else str(gen.generation)
            without = "" if gen is None or gen.has(worker_id) else f", without {worker_id!r}"
            raise Refusal(409, f"round {number}: worker {worker_id!r} of site {site!r} posted "
                               f"with generation {request.generation}, but the site's active "
                               f"generation is {actual}{without}: rejoin first")
        missing = [m.worker_id for m in gen.members if m.outer_port is None]
        if missing:
            raise Refusal(409, f"round {number}: generation {gen.generation} of site {site!r} "
                               f"has members without an outer_port ({', '.join(missing)}): "
                               "they must register with one")
        return gen

    def _drop_ended(self, number: int) -> None:
        """Forget arrivals whose generation is no longer its site's active one."""
        active = self.coordinator.store.active_numbers()
        for site, arrival in list(self._arrivals.items()):
            if active.get(site) != arrival.island.generation:
                del self._arrivals[site]
                log.warning("round %d: site %s dropped: its generation %d ended before the "
                            "round was decided", number, site, arrival.island.generation)

    def _quorum_deadline(self, request: RoundRequest) -> float:
        """When ``request``'s quorum timeout decides the pending round (inf: nobody arrived)."""
        if not self._arrivals:
            return float("inf")
        return min(a.at for a in self._arrivals.values()) + request.quorum_timeout

    def _decide(self, number: int, request: RoundRequest) -> RoundResponse:
        islands = [a.island for a in self._arrivals.values()]
        row = self.coordinator.store.decide_round(number, islands, now=time.time())
        log.info("round %d decided by %s's post (%d of %d islands expected): %s", number,
                 request.worker_id, len(islands), request.islands,
                 ", ".join(f"{i.site}@{i.generation}" for i in row.islands))
        self._pending, self._arrivals = number + 1, {}
        self._answer = RoundResponse(round=number, decided=True,
                                     islands=[self._island(i) for i in row.islands])
        self._notify()
        return self._answer

    def _decided(self, number: int) -> RoundResponse:
        """A decided round's answer, as stored."""
        if self._answer is not None and self._answer.round == number:
            return self._answer
        rows = self.coordinator.store.decided_rounds(after=number - 1, limit=1)
        if not rows or rows[0].round != number:
            first = rows[0].round if rows else None
            raise Refusal(409, f"round {number} was never decided: this coordinator's rounds "
                               f"began at {first}")
        [row] = rows
        answer = RoundResponse(round=number, decided=True,
                               islands=[self._island(i) for i in row.islands])
        if self._answer is None or number > self._answer.round:
            self._answer = answer
        return answer

    def _island(self, island: IslandRow) -> IslandOut:
        """An island with its generation's members as frozen, at their outer ports (every
        member has one: ``_membership`` refused the site's first post otherwise)."""
        gen = self.coordinator.store.generation(island.generation)
        members = [] if gen is None else [
            IslandMember(worker_id=m.worker_id, ip_address=m.ip_address, port=m.outer_port,
                         rank=m.rank) for m in gen.members]
        return IslandOut(site=island.site, generation=island.generation,
                         joining=island.joining, members=members)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def _any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    """Return when any of ``events`` is set or ``timeout`` seconds have passed."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
