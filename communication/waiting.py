"""What a rank waits for, as its transport sees it: ``InFlight`` lives on the transport's loop
and knows each collective from its coroutine's first step to its end; its *missing* ranks are
those whose contribution its slot has not received. ``Waiting`` is the answer, read by the
worker's progress reporter (worker/train/reporting.py; the watcher that lets a blocked
training thread send it is in collectives.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from communication.collectives import Key

if TYPE_CHECKING:
    from communication.accumulator import Accumulator


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """A collective this rank waits for: its key, the ranks that have not sent to it (None: the
    transport cannot tell), and how long it has been in flight."""

    key: Key
    missing: tuple[int, ...] | None
    seconds: float


class InFlight:
    """The collectives of one rank in flight, oldest first (transport loop thread only)."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[Key, float]] = {}  # insertion order: start order

    def begin(self, key: Key, now: float) -> None:
        self._keys[str(key)] = (key, now)

    def end(self, key: Key) -> None:
        self._keys.pop(str(key), None)

    def oldest(self, accumulator: Accumulator, now: float) -> Waiting | None:
        """The oldest collective still missing a contribution; else the oldest in flight (its
        sends still going out); None when nothing is in flight."""
        first = None
        for name, (key, start) in self._keys.items():
            slot = accumulator.peek(name)
            missing = tuple(slot.missing()) if slot is not None else ()
            waiting = Waiting(key=key, missing=missing, seconds=max(now - start, 0.0))
            if missing:
                return waiting
            first = first or waiting
        return first
