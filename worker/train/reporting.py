"""Where this rank's trainer is, told to the coordinator by the training thread itself.

[Note: progress reports]
``ProgressReporter`` is an engine observer (worker/engine/progress.py): each activity the
engine, trainer or checkpointer begins moves this rank's *position* (activity, step, unit,
micro-batch). At most every ``every`` seconds the position goes to the coordinator,
fire-and-forget (``Membership.report_progress``), with the oldest collective the transport has
in flight and the ranks that have not sent to it (``GrpcCollectives.waiting``; the engine never
sees it). While a collective blocks the thread, the watcher (communication/collectives.py)
wakes it every ``every`` seconds to send the same. So a rank that waits keeps reporting, and
one whose trainer hangs or is stopped falls silent: the coordinator names the silent rank, the
key it owes and the ranks waiting on it (coordinator/progress.py). Heartbeats, from their own
thread, only say that the process lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from communication.collectives import Key, Watcher, install
from communication.waiting import Waiting
from worker.engine.progress import Progress

log = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0  # the coordinator's --stall-after must be several of these
SETUP = "setup"  # the activity before the engine's first event (model build, rescue, resume)


class ProgressReporter:
    """One generation's reports of one rank; ``send(**fields)`` must never block (it is
    ``Membership.report_progress``), ``waiting()`` is the transport's view, if it has one."""

    def __init__(self, send: Callable[..., None], *, rank: int, generation: int,
                 waiting: Callable[[], Waiting | None] | None = None,
                 every: float = REPORT_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.send = send
        self.rank = rank
        self.generation = generation
        self.every = every
        self._waiting = waiting
        self._clock = clock
        self._position: tuple[str, int | None, int | None, int | None] = (SETUP, None, None,
                                                                          None)
        self._moved_at = clock()
        self._sent_at = float("-inf")

    def __call__(self, progress: Progress) -> None:
        """The observer: a new activity began; report if the last report is ``every`` old."""
        position = (progress.activity.value, progress.step, progress.unit, progress.micro_batch)
        now = self._clock()
        if position != self._position:
            self._position, self._moved_at = position, now
        if now - self._sent_at >= self.every:
            self.report()

    def while_waiting(self, key: Key, seconds: float) -> None:
        """The watcher: the thread has waited ``seconds`` for ``key`` so far."""
        self.report(Waiting(key=key, missing=None, seconds=seconds))

    def install(self) -> Callable[[], None]:
        """Make this the process's watcher; returns the call that removes it."""
        return install(Watcher(self.while_waiting, self.every))

    def report(self, blocked: Waiting | None = None) -> None:
        """Send the position now, with what this rank waits for: the transport's oldest
        collective in flight (it knows who has not sent), else the one ``blocked`` on."""
        now = self._clock()
        self._sent_at = now
        waiting = (self._waiting() if self._waiting is not None else None) or blocked
        activity, step, unit, micro_batch = self._position
        fields = {"rank": self.rank, "generation": self.generation, "activity": activity,
                  "step": step, "unit": unit, "micro_batch": micro_batch,
                  "idle_s": round(now - self._moved_at, 3)}
        if waiting is not None:
            fields["waiting"] = {
                "key": str(waiting.key), "what": waiting.key.describe(),
                "missing": None if waiting.missing is None else list(waiting.missing),
                "seconds": round(waiting.seconds, 3)}
        self.send(**fields)


def peer_links(collectives) -> list:
    """The transport's per-peer links (communication/links.py), [] for one that has none."""
    links = getattr(collectives, "links", None)
    return links() if links is not None else []
