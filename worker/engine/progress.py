"""What a worker is doing, published to the observers it was given.

The engine (gathers, forwards, backwards, reduce-scatters), the trainer (optimizer updates)
and the checkpointer (rank files) each call ``Observers.publish`` at the moment an activity
begins. Observers are plain callables: progress reporting ("who is stuck") and the failure
tests' fault injection (``tests/harness/faults.py``) are two of them. Nothing is read from the
environment; a run without observers pays one truth test per event.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Activity(enum.Enum):
    """Where in a step a worker is; published as it begins."""

    GATHER = "gather"  # a unit's all-gather is being issued (a prefetch included)
    FORWARD = "forward"  # a unit's forward is about to run
    BACKWARD = "backward"  # a unit's backward is about to run
    REDUCE_SCATTER = "reduce_scatter"  # a unit's gradient is about to be reduce-scattered
    OPTIMIZER = "optimizer"  # the owned slices are about to be updated
    CHECKPOINT = "checkpoint"  # this rank's file is written, the checkpoint not yet published


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """One published event: what began, on which rank, in which step, unit and micro-batch."""

    activity: Activity
    rank: int
    step: int
    unit: int | None = None
    micro_batch: int | None = None


Observer = Callable[[Progress], None]


class Observers:
    """The observers of one worker, called in order on every event."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = tuple(observers)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def adding(self, *observers: Observer) -> Observers:
        """These observers and ``observers`` after them (a generation adds its own)."""
        return Observers((*self._observers, *observers))

    def publish(self, progress: Progress) -> None:
        for observer in self._observers:
            observer(progress)


NO_OBSERVERS = Observers()
