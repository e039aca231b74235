"""Who is stuck: each member's latest progress report, and the rule that names a stalled rank.

[Note: stalled]
A member's training thread reports its position about every second while it runs, and every
second while a collective blocks it, naming the oldest collective it waits for and the ranks
that have not sent to it (worker/train/reporting.py). A rank is *stalled* when nothing came
from it for ``stall_after`` seconds (counted from the generation's start if it never reported)
while another member reported since, within ``stall_after``: a trainer that hangs, or a process
that is stopped, falls silent while the ranks waiting on it keep talking. When every member is
silent nobody is named (the coordinator cannot tell who is to blame). ``status`` applies the
rule at the moment it is asked; the heartbeat monitor calls ``check`` at the next moment a rank
could become stalled, to log each change once. Reports live in memory: they are a live view,
and a restarted coordinator hears them again within a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.progress_models import (
    ProgressRequest,
    RankStatus,
    StalledRank,
    StatusResponse,
    WaitingReport,
)
from coordinator.rows import GenerationRow, Member
from coordinator.service import Refusal
from coordinator.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Heard:
    report: ProgressRequest
    at: float  # when it arrived, by this coordinator's clock


def _address(m: Member) -> str:
    return f"[{m.ip_address}]:{m.port}" if ":" in m.ip_address else f"{m.ip_address}:{m.port}"


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


class ProgressBoard:
    """The latest report of every member of an active generation, by worker id."""

    def __init__(self, store: Store, *, stall_after: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.stall_after = stall_after
        self.clock = clock
        self.on_new: Callable[[], None] | None = None  # a rank's first report (the monitor)
        self._heard: dict[str, _Heard] = {}
        self._named: dict[str, frozenset[int]] = {}  # site -> ranks stalled at the last check

    def record(self, report: ProgressRequest) -> None:
        """Keep ``report``; refused (404, 409) unless it comes from that rank of its site's
        active generation."""
        worker = self.store.worker(report.worker_id)
        if worker is None:
            raise Refusal(404, f"unknown worker {report.worker_id!r}: register first "
                               "(POST /workers/register)")
        gen = self.store.current_generation(worker.site)
        rank = next((m.rank for m in gen.members if m.worker_id == report.worker_id),
                    None) if gen else None
        if gen is None or gen.generation != report.generation or rank != report.rank:
            active = f"generation {gen.generation}, where it is rank {rank}" if gen else "none"
            raise Refusal(409, f"{report.worker_id} is not rank {report.rank} of generation "
                               f"{report.generation} in site {worker.site} (active: {active})")
        last = self._heard.get(report.worker_id)
        self._heard[report.worker_id] = _Heard(report, self.clock())
        if (last is None or last.report.generation != report.generation) and self.on_new:
            self.on_new()

    # -- the rule ------------------------------------------------------------------------------

    def status(self, site: str) -> StatusResponse:
        """``site``'s active generation rank by rank, who is stalled, and the sentence."""
        now = self.clock()
        gen = self.store.current_generation(site)
        if gen is None:
            return StatusResponse(site=site, generation=None, stall_after=self.stall_after,
                                  ranks=[], stalled=[],
                                  sentence=f"no generation is active in site {site}")
        ranks, stalled = self._judge(gen, now)
        return StatusResponse(site=site, generation=gen.generation,
                              stall_after=self.stall_after, ranks=ranks, stalled=stalled,
                              sentence=_sentence(gen, ranks, stalled, self.stall_after))

    def _heard_at(self, gen: GenerationRow, m: Member) -> tuple[float, _Heard | None]:
        heard = self._heard.get(m.worker_id)
        if heard is None or heard.report.generation != gen.generation:
            return gen.created_at, None
        return heard.at, heard

    def _judge(self, gen: GenerationRow, now: float
               ) -> tuple[list[RankStatus], list[StalledRank]]:
        at = {m.rank: self._heard_at(gen, m) for m in gen.members}
        silent = {r: now - t for r, (t, _) in at.items()}

        def stalled(r: int) -> bool:
            return silent[r] >= self.stall_after and any(
                o != r and at[o][0] > at[r][0] and silent[o] < self.stall_after for o in at)

        ranks = []
        for m in gen.members:
            _, heard = at[m.rank]
            row = RankStatus(rank=m.rank, worker_id=m.worker_id, address=_address(m),
                             stalled=stalled(m.rank),
                             silent_s=round(silent[m.rank], 3) if heard else None)
            if heard is not None:
                r, late = heard.report, now - heard.at
                row.idle_s = round(r.idle_s + late, 3)
                row.activity, row.step, row.unit, row.micro_batch = (
                    r.activity, r.step, r.unit, r.micro_batch)
                if r.waiting is not None:
                    row.waiting = r.waiting.model_copy(
                        update={"seconds": round(r.waiting.seconds + late, 3)})
            ranks.append(row)
        named = []
        for row in ranks:
            if not row.stalled:
                continue
            waiters = [o for o in ranks if o.waiting and row.rank in (o.waiting.missing or ())]
            owes = max((o.waiting for o in waiters), key=lambda w: w.seconds, default=None)
            named.append(StalledRank(rank=row.rank, worker_id=row.worker_id,
                                     address=row.address, silent_s=round(silent[row.rank], 3),
                                     owes=owes, waiting_ranks=[o.rank for o in waiters]))
        return ranks, named

    # -- the monitor's tick --------------------------------------------------------------------

    def check(self) -> float | None:
        """Log every rank that became stalled, or reports again, since the last check; forget
        reports of generations no longer active. Returns when the next rank could become
        stalled (this clock), None if no generation is active."""
        now, due = self.clock(), None
        active = self.store.active_generations()
        for gen in active:
            ranks, stalled = self._judge(gen, now)
            named = frozenset(s.rank for s in stalled)
            before = self._named.get(gen.site, frozenset())
            for s in stalled:
                if s.rank not in before:
                    log.warning("site %s: %s", gen.site, _stalled_words(s, ranks))
            for row in ranks:
                if row.rank in before and row.rank not in named:
                    log.info("site %s: rank %d (%s at %s) reports again", gen.site, row.rank,
                             row.worker_id, row.address)
            self._named[gen.site] = named
            for m in gen.members:
                if m.rank not in named:
                    deadline = self._heard_at(gen, m)[0] + self.stall_after
                    due = deadline if due is None else min(due, deadline)
        members = {(m.worker_id, g.generation) for g in active for m in g.members}
        for worker_id in [w for w, h in self._heard.items()
                          if (w, h.report.generation) not in members]:
            del self._heard[worker_id]
        self._named = {g.site: self._named.get(g.site, frozenset()) for g in active}
        return due


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _stalled_words(s: StalledRank, ranks: list[RankStatus]) -> str:
    who = f"rank {s.rank} ({s.worker_id} at {s.address})"
    if s.owes is not None:
        waiting = "is" if len(s.waiting_ranks) == 1 else "are"
        return (f"{who} has sent nothing for {s.owes.what} for {_seconds(s.owes.seconds)}; "
                f"{_ranks(s.waiting_ranks)} {waiting} waiting on it")
    row = next(r for r in ranks if r.rank == s.rank)
    if row.activity is None:
        return f"{who} has reported nothing for {_seconds(s.silent_s)}; no rank is waiting on it yet"
    where = ", ".join(f"{name} {value}" for name, value in (
        ("unit", row.unit), ("micro-batch", row.micro_batch), ("step", row.step))
        if value is not None)
    return (f"{who} has reported nothing for {_seconds(s.silent_s)} (last: {row.activity}"
            f"{' of ' + where if where else ''}); no rank is waiting on it yet")


def _sentence(gen: GenerationRow, ranks: list[RankStatus], stalled: list[StalledRank],
              stall_after: float) -> str:
    if stalled:
        return "; and ".join(_stalled_words(s, ranks) for s in stalled)
    blocked = [r for r in ranks if r.waiting and r.waiting.seconds >= stall_after]
    if blocked:
        r = max(blocked, key=lambda r: r.waiting.seconds)
        w: WaitingReport = r.waiting
        source = f" from {_ranks(w.missing)}" if w.missing else ""
        return (f"no rank is stalled, but rank {r.rank} ({r.worker_id} at {r.address}) has "
                f"waited {_seconds(w.seconds)} for {w.what}{source}")
    steps = sorted({r.step for r in ranks if r.step is not None})
    if not steps:
        return (f"no rank is stalled: generation {gen.generation} of {len(ranks)} ranks, no "
                "progress reported yet")
    at = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    return f"no rank is stalled: {len(ranks)} ranks training, at {at}"
