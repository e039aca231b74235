"""The heartbeat task: keeps this worker alive at the coordinator, carrying its status."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from worker.membership.client import CoordinatorClient
from worker.membership.task import BackgroundTask

log = logging.getLogger(__name__)


class HeartbeatTask(BackgroundTask):
    """Heartbeats every ``interval`` seconds (±``jitter``), survives failures, stops at once.

    Create, ``start()`` and ``stop()`` it on the client's event loop.
    """

    name = "heartbeat"

    def __init__(self, client: CoordinatorClient, *, interval: float = 2.0,
                 jitter: float = 0.1) -> None:
        self.client = client
        self.interval = interval
        self.jitter = jitter
        self.sent = 0
        self._status: dict[str, Any] = {}
        super().__init__()

    def update(self, **status: Any) -> None:
        """Replace fields of the status the next heartbeats carry."""
        self._status.update(status)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                # Retried for one period at most: the next beat is the retry, with fresh status
                # (the client's own window is a minute of resending a stale one).
                await self.client.heartbeat(retry_for=self.interval, **self._status)
                self.sent += 1
                if failing:
                    log.info("%s: heartbeats reach the coordinator again", self.client.worker_id)
                failing = False
            except Exception as exc:  # a failed beat is logged; the next one may get through
                if not failing:  # once per streak, not every beat
                    log.warning("%s: heartbeat failed: %s", self.client.worker_id, exc)
                failing = True
            delay = self.interval * random.uniform(1 - self.jitter, 1 + self.jitter)
            await asyncio.sleep(delay)  # the beat's period; stop() cancels it
