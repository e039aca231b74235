"""A synchronous membership facade for the training thread.

The coordinator client and the heartbeat task live on an asyncio loop in a daemon thread;
the training thread submits coroutines to it and waits on them with deadlines.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from communication.loop_thread import LoopThread
from worker.membership.client import REQUEST_TIMEOUT_S, CoordinatorClient
from worker.membership.enrolment import RenewalTask, SecureClient
from worker.membership.heartbeat import HeartbeatTask
from worker.membership.identity import WorkerIdentity
from worker.membership.views import DEFAULT_SITE, Generation, RoundInfo

log = logging.getLogger(__name__)

GRACE_S = 5.0  # beyond a call's own deadlines, before the facade gives up on the loop
MAX_PENDING_REPORTS = 64  # telemetry beyond this many in flight is dropped, not queued
CLOSE_DEADLINE_S = 5.0


class Membership:
    """Join, rejoin, take part in outer rounds, report and leave, from synchronous code.

    ``site`` is the island this worker trains in (its generations are that site's);
    ``outer_port`` is its second gRPC server, where other islands reach it in outer rounds."""

    def __init__(self, url: str, *, token: str | None = None, worker_id: str, ip_address: str,
                 port: int, device: str = "cpu", heartbeat_interval: float = 2.0,
                 request_timeout: float = REQUEST_TIMEOUT_S, site: str = DEFAULT_SITE,
                 outer_port: int | None = None, identity: WorkerIdentity | None = None,
                 **info: Any) -> None:
        """``identity``: a TLS cluster's (enrolment.py): HTTPS, a certificate, a credential."""
        self.worker_id = worker_id
        self.site = site
        self._registration = {"ip_address": ip_address, "port": port, "device": device,
                              "site": site, "outer_port": outer_port, **info}
        self._client = (CoordinatorClient(url, token=token, worker_id=worker_id,
                                          request_timeout=request_timeout) if identity is None
                        else SecureClient(url, identity=identity, token=token,
                                          worker_id=worker_id, request_timeout=request_timeout))
        self._renewal = None if identity is None else RenewalTask(self._client)
        self._heartbeat = HeartbeatTask(self._client, interval=heartbeat_interval)
        self._last_generation: int | None = None
        self._pending = 0
        self._dropped = 0
        self._lock = threading.Lock()
        self._closed = False
        self._loop = LoopThread(f"membership-{worker_id}")

    def _call(self, coro: Any, timeout: float, what: str) -> Any:
        """Run ``coro`` (the ``what`` call, whose own deadlines end within ``timeout`` s plus
        one request) on the loop. The facade waits longer than that, so the coroutine's own
        error (the barrier's counts, the coordinator's refusal or unreachability) is the one
        raised; its TimeoutError is only for a loop that stopped answering."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"membership of {self.worker_id} is closed")
        future = self._loop.submit(coro)
        wait = timeout + self._client.request_timeout + GRACE_S
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own TimeoutError (the barrier's, with counts)
                raise
            future.cancel()
            raise TimeoutError(
                f"{self.worker_id}: {what} at the coordinator {self._client.url} took over "
                f"{wait:.1f}s") from None
        except BaseException:
            future.cancel()
            raise

    @property
    def generation(self) -> int | None:
        """The last generation this worker was given."""
        return self._last_generation

    def join(self, min_workers: int, *, timeout: float) -> Generation:
        """Register, start heartbeating, and wait at the barrier for a generation; all of it
        within ``timeout`` seconds (the last request may end one request timeout later)."""
        async def _join() -> Generation:
            start = time.monotonic()
            if self._renewal is None:
                await self._client.register(**self._registration, retry_for=timeout)
            else:
                await self._client.enrol(**self._registration, retry_for=timeout)
                self._renewal.start()
            self._heartbeat.start()
            remaining = start + timeout - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self.worker_id}: registering at the coordinator {self._client.url} took "
                    f"{time.monotonic() - start:.1f}s of the {timeout:.1f}s join timeout; the "
                    "barrier was not reached")
            return await self._client.wait_ready(min_workers, timeout=remaining)

        gen = self._call(_join(), timeout, f"join (min_workers={min_workers})")
        self._last_generation = gen.generation
        return gen

    def rejoin(self, min_workers: int, *, timeout: float) -> Generation:
        """After a failure: wait for a generation newer than the last one this worker saw."""
        gen = self._call(self._client.wait_ready(min_workers, timeout=timeout,
                                                 after_generation=self._last_generation),
                         timeout, f"rejoin after generation {self._last_generation}")
        self._last_generation = gen.generation
        return gen

    def outer_round(self, round: int, *, site: str | None = None,
                    generation: int | None = None, joining: bool = False, islands: int,
                    quorum_timeout: float, timeout: float) -> RoundInfo:
        """Arrive at outer round ``round`` and wait until it is decided (see
        ``CoordinatorClient.outer_round``); ``site`` and ``generation`` default to this
        worker's site and the last generation it was given."""
        site = self.site if site is None else site
        generation = self._last_generation if generation is None else generation
        if generation is None:
            raise RuntimeError(f"{self.worker_id}: outer round {round} before joining a "
                               f"generation of site {site}")
        return self._call(self._client.outer_round(
            round, site=site, generation=generation, joining=joining, islands=islands,
            quorum_timeout=quorum_timeout, timeout=timeout),
            timeout, f"outer round {round} of site {site} (generation {generation})")

    def last_round(self) -> int:
        """The newest decided outer round (0 if none); retried for one request timeout."""
        retry_for = self._client.request_timeout
        return self._call(self._client.last_round(retry_for=retry_for), retry_for,
                          "last outer round")

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                wait: float = 0.0, retry_for: float = 120.0) -> Any:
        """One coordinator request (a long-poll of ``wait`` s), retried on transient failures
        for ``retry_for`` s, so a coordinator restart is ridden out (the service's calls)."""
        timeout = wait + self._client.request_timeout
        return self._call(self._client._request(method, path, body=body, params=params,
                                                timeout=timeout, retry_for=retry_for),
                          timeout + retry_for, f"{method} {path}")

    def update_status(self, **status: Any) -> None:
        """Set fields of the next heartbeats' status; never blocks."""
        if not self._closed:
            self._loop.call_soon(functools.partial(self._heartbeat.update, **status))

    def report(self, **metrics: Any) -> None:
        """Fire-and-forget telemetry: never blocks, never raises; drops when backed up."""
        self._fire(functools.partial(self._client.report_telemetry, retry_for=0.0, **metrics))

    def report_progress(self, **fields: Any) -> None:
        """Fire-and-forget progress of this worker's trainer (``POST /training/progress``),
        as ``report``: sent by the training thread itself, about every second."""
        self._fire(functools.partial(self._client.report_progress, retry_for=0.0, **fields))

    def _fire(self, call: Callable[[], Coroutine]) -> None:
        try:
            with self._lock:
                if self._closed:
                    return
                if self._pending >= MAX_PENDING_REPORTS:
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("%s: coordinator slow; dropping telemetry", self.worker_id)
                    return
                self._pending += 1
            future = self._loop.submit(call())
            future.add_done_callback(self._reported)
        except Exception as exc:  # telemetry must never stop training
            log.warning("%s: telemetry not sent: %s", self.worker_id, exc)

    def _reported(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending -= 1
        if not future.cancelled() and future.exception() is not None:
            log.debug("%s: telemetry failed: %s", self.worker_id, future.exception())

    def leave(self) -> None:
        """Stop heartbeating and leave the coordinator gracefully; retries for one request
        timeout at most (a process on its way out does not wait a minute for a dead
        coordinator)."""
        retry_for = self._client.request_timeout

        async def _leave() -> None:
            await self._heartbeat.stop()
            if self._renewal is not None:
                await self._renewal.stop()
            await self._client.leave(retry_for=retry_for)

        self._call(_leave(), retry_for, "leave")

    def close(self) -> None:
        """Stop the heartbeat, close the session and the loop thread; idempotent, bounded."""
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def _shutdown() -> None:
            await self._heartbeat.stop()
            if self._renewal is not None:
                await self._renewal.stop()
            await self._client.close()

        try:
            self._loop.call(_shutdown(), timeout=CLOSE_DEADLINE_S)
        except Exception as exc:
            log.warning("%s: membership shutdown incomplete: %s", self.worker_id, exc)
        self._loop.stop(timeout=CLOSE_DEADLINE_S)

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
