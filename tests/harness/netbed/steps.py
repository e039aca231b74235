"""Per-step wall times of a run, read from rank 0's log lines.

The trainer logs ``step N loss ...`` on rank 0 after every step (``--log-every 1``, the
default) with a millisecond timestamp; a step's time is the gap to the previous step line.
The first step has no previous line (its gap would include joining and building the engine),
so ``step_times`` covers steps 2 onward: a 3-step run gives two.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger(__name__)

STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank 0 INFO \S+: step (\d+) loss ")


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTime:
    step: int  # as logged (0-based)
    seconds: float


def step_times(lines: Iterable[str]) -> list[StepTime]:
    """Gaps between consecutive rank-0 step lines, in the order they were logged."""
    stamps = []
    for line in lines:
        if m := STEP_LINE.match(line):
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps.append((int(m.group(2)), t))
    return [StepTime(step=s, seconds=t - prev)
            for (_, prev), (s, t) in zip(stamps, stamps[1:])]


def rank0_step_times(outputs: Iterable[Iterable[str]]) -> list[StepTime]:
    """``step_times`` of whichever process logged rank 0's step lines (children's ``lines``)."""
    for lines in outputs:
        if found := step_times(lines):
            return found
    return []


def median_seconds(times: list[StepTime]) -> float:
    return statistics.median(t.seconds for t in times) if times else float("nan")
