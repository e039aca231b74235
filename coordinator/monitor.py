"""The heartbeat monitor: one task that sleeps until the next worker could expire, or the next
rank could become stalled (coordinator/progress.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from coordinator.progress import ProgressBoard
from coordinator.service import Coordinator

log = logging.getLogger(__name__)

SLACK_S = 0.01  # wake this much after a deadline so the expired worker is strictly late


class HeartbeatMonitor:
    """Marks workers dead after ``coordinator.heartbeat_timeout`` without a heartbeat.

    A heartbeat only moves a deadline later, and a new worker's deadline is a full timeout
    away, so sleeping until the oldest heartbeat's deadline (or one timeout) never misses one.
    The same tick checks ``board`` for stalled ranks: a report only moves a rank's deadline
    later too, and a rank's first report wakes the monitor (``wake``).
    """

    def __init__(self, coordinator: Coordinator, board: ProgressBoard | None = None) -> None:
        self.coordinator = coordinator
        self.board = board
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat-monitor")
        if self.board is not None:
            self.board.on_new = self._wake.set

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _delay(self, now: float) -> float:
        timeout = self.coordinator.heartbeat_timeout
        oldest = self.coordinator.store.oldest_heartbeat()
        delay = timeout if oldest is None else max(oldest + timeout - now, 0.0) + SLACK_S
        if self.board is not None and (due := self.board.check()) is not None:
            delay = min(delay, max(due - now, 0.0) + SLACK_S)
        return delay

    async def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                self.coordinator.expire(now)
                delay = self._delay(now)
            except Exception:  # a store error must not kill failure detection for good
                log.exception("heartbeat monitor check failed; retrying")
                delay = min(1.0, self.coordinator.heartbeat_timeout)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
