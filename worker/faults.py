"""Fault injection for the failure tests: SIGKILL this process at a named phase.

Armed only by the environment (``ZEROP2P_FAULT=phase:step:rank``, e.g. ``backward:3:1``) and
read once at import; in a normal run ``maybe_die`` is a comparison with None. Phases:
gather, forward, backward, reduce_scatter, optimizer, checkpoint. With ``ZEROP2P_FAULT_MARK``
set to a path, the fault fires once: the file is created before dying and disarms restarts.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

PHASES = ("gather", "forward", "backward", "reduce_scatter", "optimizer", "checkpoint")


def _parse(spec: str | None) -> tuple[str, int, int] | None:
    if not spec:
        return None
    try:
        phase, step, rank = spec.split(":")
        armed = (phase, int(step), int(rank))
    except ValueError:
        raise ValueError(f"ZEROP2P_FAULT must be phase:step:rank, got {spec!r}") from None
    if phase not in PHASES:
        raise ValueError(f"ZEROP2P_FAULT phase {phase!r} is not one of {PHASES}")
    return armed


ARMED = _parse(os.environ.get("ZEROP2P_FAULT"))


def maybe_die(phase: str, *, step: int, rank: int) -> None:
    """SIGKILL ourselves if the armed fault matches (phase, step, rank)."""
    if ARMED is not None and ARMED == (phase, step, rank):
        mark = os.environ.get("ZEROP2P_FAULT_MARK")
        if mark:
            try:
                with open(mark, "x"):
                    pass
            except FileExistsError:
                return
        log.error("fault injection: SIGKILL at %s, step %d, rank %d", phase, step, rank)
        os.kill(os.getpid(), signal.SIGKILL)
