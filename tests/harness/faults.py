"""Fault injection for the failure tests: SIGKILL this process at a named phase.

Armed only by the environment and read once at import; in a normal run ``maybe_die`` is a
comparison with None. ``ZEROP2P_FAULT=phase:step:rank[,phase:step:rank...]``, e.g.
``backward:3:1``; phases: gather, forward, backward, reduce_scatter, optimizer, checkpoint.
With ``ZEROP2P_FAULT_MARK=PREFIX`` each fault fires once: ``PREFIX.<i>`` is created before
dying, so a restarted worker with the same environment is not killed again.
"""

from __future__ import annotations

import enum
import logging
import os
import signal

log = logging.getLogger(__name__)

class Fault(enum.Enum):
    """Where in a step a worker can be killed; the value is its name in ZEROP2P_FAULT."""

    GATHER = "gather"  # a unit's all-gather is being issued
    FORWARD = "forward"  # a unit's forward is about to run
    BACKWARD = "backward"  # a unit's backward is about to run
    REDUCE_SCATTER = "reduce_scatter"  # a unit's gradient is about to be reduce-scattered
    OPTIMIZER = "optimizer"  # the owned slices are about to be updated
    CHECKPOINT = "checkpoint"  # this rank's file is written, the checkpoint not yet published


PHASES = tuple(f.value for f in Fault)


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


def maybe_die(fault: Fault, *, step: int, rank: int) -> None:
    """SIGKILL ourselves if an armed fault matches (fault, step, rank)."""
    if ARMED is None or (fault.value, step, rank) not in ARMED:
        return
    phase = fault.value
    mark = os.environ.get("ZEROP2P_FAULT_MARK")
    if mark:
        try:
            with open(f"{mark}.{ARMED.index((phase, step, rank))}", "x"):
                pass
        except FileExistsError:
            return
    log.error("fault injection: SIGKILL at %s, step %d, rank %d", phase, step, rank)
    os.kill(os.getpid(), signal.SIGKILL)
