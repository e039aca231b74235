"""A coroutine the membership loop runs in the background until stopped (heartbeats, renewal)."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundTask:
    """``start`` runs ``_run`` as a task on the running loop (once); ``stop`` cancels it and
    waits until it is gone (the task wakes at once; work in flight is abandoned)."""

    name = "background"

    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        raise NotImplementedError
