"""Fault injection for the failure tests: SIGKILL this process at a named phase.

Armed only by the environment and read once at import; in a normal run ``maybe_die`` is a
comparison with None. ``ZEROP2P_FAULT=phase:step:rank[,phase:step:rank...]``, e.g.
``backward:3:1``; phases: gather, forward, backward, reduce_scatter, optimizer, checkpoint.
With ``ZEROP2P_FAULT_MARK=PREFIX`` each fault fires once: ``PREFIX.<i>`` is created before
dying, so a restarted worker with the same environment is not killed again.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

PHASES = ("gather", "forward", "backward", "reduce_scatter", "optimizer", "checkpoint")


def parse(spec: str | None) -> list[tuple[str, int, int]] | None:
    """``phase:step:rank`` items, comma-separated; None when unset."""
    if not spec:
        return None
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


ARMED = parse(os.environ.get("ZEROP2P_FAULT"))


def maybe_die(phase: str, *, step: int, rank: int) -> None:
    """SIGKILL ourselves if an armed fault matches (phase, step, rank)."""
    if ARMED is None or (phase, step, rank) not in ARMED:
        return
    mark = os.environ.get("ZEROP2P_FAULT_MARK")
    if mark:
        try:
            with open(f"{mark}.{ARMED.index((phase, step, rank))}", "x"):
                pass
        except FileExistsError:
            return
    log.error("fault injection: SIGKILL at %s, step %d, rank %d", phase, step, rank)
    os.kill(os.getpid(), signal.SIGKILL)
