"""An asyncio event loop running in a daemon thread, driven from synchronous code.

The transport and the worker's membership both keep their async clients on such a loop while
the training thread stays synchronous: one way to start it, submit a coroutine (a concurrent
future comes back), run a callback on it, and stop it within a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class LoopThread:
    """A started event loop in the daemon thread ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine) -> Future:
        """Schedule ``coro`` on the loop from any thread; a future for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine, *, timeout: float) -> Any:
        """Run ``coro`` on the loop and wait for its result at most ``timeout`` seconds."""
        return self.submit(coro).result(timeout=timeout)

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run a plain callback on the loop's thread soon (never blocks)."""
        self.loop.call_soon_threadsafe(callback)

    def stop(self, *, timeout: float) -> None:
        """Stop the loop and join its thread; the loop is closed if the thread ended in time."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("loop thread %s did not stop within %.1fs", self.name, timeout)
            return
        self.loop.close()
