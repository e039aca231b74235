"""Fault injection for the failure tests: an engine observer that SIGKILLs its process when
a named activity begins at a given step on a given rank.

Installed by the tests (and ``scripts/bench_recovery.py``) through ``fault_worker.py``, never
by a normal worker. ``ZEROP2P_FAULT=phase:step:rank[,phase:step:rank...]``, e.g.
``backward:3:1``; phases are the engine's activities: gather, forward, backward,
reduce_scatter, optimizer, checkpoint. With ``ZEROP2P_FAULT_MARK=PREFIX`` each fault fires
once: ``PREFIX.<i>`` is created before dying, so a restarted worker with the same environment
is not killed again.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from worker.engine.progress import Activity, Progress

log = logging.getLogger(__name__)

PHASES = tuple(a.value for a in Activity)


def parse(spec: str) -> list[tuple[str, int, int]]:
    """``phase:step:rank`` items, comma-separated."""
    faults = []
    for item in spec.split(","):
        try:
            phase, step, rank = item.strip().split(":")
            faults.append((phase, int(step), int(rank)))
        except ValueError:
            raise ValueError(f"ZEROP2P_FAULT items must be phase:step:rank, got {item!r}") from None
        if phase not in PHASES:
            raise ValueError(f"ZEROP2P_FAULT phase {phase!r} is not one of {PHASES}")
    return faults


@dataclass(frozen=True, slots=True)
class FaultInjector:
    """The observer: SIGKILL at the first event matching an armed (phase, step, rank)."""

    faults: tuple[tuple[str, int, int], ...]
    mark: str | None = None

    @classmethod
    def from_env(cls, env: dict) -> FaultInjector | None:
        spec = env.get("ZEROP2P_FAULT")
        if not spec:
            return None
        return cls(tuple(parse(spec)), env.get("ZEROP2P_FAULT_MARK"))

    def __call__(self, progress: Progress) -> None:
        item = (progress.activity.value, progress.step, progress.rank)
        if item not in self.faults:
            return
        if self.mark:
            try:
                with open(f"{self.mark}.{self.faults.index(item)}", "x"):
                    pass
            except FileExistsError:
                return
        log.error("fault injection: SIGKILL at %s, step %d, rank %d", *item)
        os.kill(os.getpid(), signal.SIGKILL)
