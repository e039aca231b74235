"""The heartbeat monitor: one task that sleeps until the next worker could expire."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from coordinator.service import Coordinator

log = logging.getLogger(__name__)

SLACK_S = 0.01  # wake this much after a deadline so the expired worker is strictly late


class HeartbeatMonitor:
    """Marks workers dead after ``coordinator.heartbeat_timeout`` without a heartbeat.

    A heartbeat only moves a deadline later, and a new worker's deadline is a full timeout
    away, so sleeping until the oldest heartbeat's deadline (or one timeout) never misses one.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat-monitor")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _delay(self, now: float) -> float:
        timeout = self.coordinator.heartbeat_timeout
        oldest = self.coordinator.store.oldest_heartbeat()
        if oldest is None:
            return timeout
        return max(oldest + timeout - now, 0.0) + SLACK_S

    async def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                self.coordinator.expire(now)
                delay = self._delay(now)
            except Exception:  # a store error must not kill failure detection for good
                log.exception("heartbeat monitor check failed; retrying")
                delay = min(1.0, self.coordinator.heartbeat_timeout)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
