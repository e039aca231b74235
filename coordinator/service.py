"""Membership rules: registration, heartbeats, leaving, death, and what ends a generation.

Generations are per site: each site (island) has at most one active generation, formed of its
own alive workers, and a worker's death, leave or re-registration ends only the one it is a
member of. Numbers are shared by every site, so they never collide on the wire.

Routes and the heartbeat monitor call this; it owns the store and wakes barrier waiters on
every change. It knows nothing of HTTP: refusals are ``Refusal`` exceptions with a status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from coordinator.config import TELEMETRY_ROWS_PER_WORKER
from coordinator.fields import DEFAULT_SITE, MAX_GENERATION
from coordinator.rows import GenerationRow, WorkerRow
from coordinator.store import Store

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A request the rules refuse; ``status`` is the HTTP status the route answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Coordinator:
    """The registry and generation bookkeeping over one ``Store``."""

    def __init__(self, store: Store, *, heartbeat_timeout: float) -> None:
        self.store = store
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeats_received = 0
        self._changed = asyncio.Event()

    # -- change notification -------------------------------------------------------------------

    def changed(self) -> asyncio.Event:
        """An event set at the next membership change (take it before checking state)."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- workers -------------------------------------------------------------------------------

    def register(self, worker_id: str, *, ip_address: str, port: int, device: str | None,
                 info: dict[str, Any], site: str = DEFAULT_SITE,
                 outer_port: int | None = None) -> bool:
        """Add or revive a worker of ``site``; returns whether it was known. A member
        re-registering ends its generation: its old process, and the peers' connections to
        it, are gone."""
        known = self.store.worker(worker_id) is not None
        self.store.upsert_worker(worker_id, ip_address=ip_address, port=port, device=device,
                                 info=info, now=time.time(), site=site, outer_port=outer_port)
        log.info("%s %s at %s:%d (site %s%s)", worker_id,
                 "re-registered" if known else "registered", ip_address, port, site,
                 f", outer port {outer_port}" if outer_port is not None else "")
        self._end_if_member(worker_id, f"{worker_id} re-registered")
        self._notify()
        return known

    def _known(self, worker_id: str) -> WorkerRow:
        worker = self.store.worker(worker_id)
        if worker is None:
            raise Refusal(404, f"unknown worker {worker_id!r}: register first "
                               "(POST /workers/register)")
        return worker

    def _alive(self, worker_id: str) -> WorkerRow:
        worker = self._known(worker_id)
        if worker.status != "alive":
            raise Refusal(409, f"worker {worker_id!r} is {worker.status}: register again "
                               "(POST /workers/register) to rejoin")
        return worker

    def heartbeat(self, worker_id: str, status: dict[str, Any]) -> None:
        """Record a heartbeat from an alive worker; a dead or departed one must re-register.

        The hot path is one UPDATE; the lookup that names the refusal runs only on a miss."""
        if not self.store.heartbeat(worker_id, now=time.time(), status=status):
            self._alive(worker_id)  # raises: unknown (404), or dead or left (409)
            raise AssertionError(f"worker {worker_id!r} is alive but its heartbeat wrote nothing")
        self.heartbeats_received += 1

    def leave(self, worker_id: str) -> None:
        """A graceful departure; a member leaving ends its generation."""
        self._known(worker_id)
        self.store.set_status(worker_id, "left")
        log.info("%s left", worker_id)
        self._end_if_member(worker_id, f"{worker_id} left")
        self._notify()

    def expire(self, now: float) -> list[str]:
        """Mark dead every alive worker silent for longer than the timeout; returns them."""
        dead = self.store.expired(now - self.heartbeat_timeout)
        for worker_id in dead:
            self.store.set_status(worker_id, "dead")
            log.warning("%s marked dead: no heartbeat for %.1fs", worker_id,
                        self.heartbeat_timeout)
            self._end_if_member(worker_id, f"{worker_id} died")
        if dead:
            self._notify()
        return dead

    def telemetry(self, worker_id: str, metrics: dict[str, Any]) -> None:
        """Append one telemetry row for a known worker (one transaction; the lookup that names
        a 404 runs only when nothing was written)."""
        if not self.store.add_telemetry(worker_id, ts=time.time(), metrics=metrics,
                                        keep=TELEMETRY_ROWS_PER_WORKER):
            self._known(worker_id)  # raises: unknown (404)

    # -- generations ---------------------------------------------------------------------------

    def _end_if_member(self, worker_id: str, reason: str) -> None:
        """End the active generation ``worker_id`` is in, whichever site's (a re-registration
        may have moved the worker to another site since it was frozen)."""
        for gen in self.store.active_generations():
            if gen.has(worker_id):
                self.end_generation(gen, reason)

    def end_generation(self, gen: GenerationRow, reason: str) -> None:
        self.store.end_generation(gen.generation, reason=reason, now=time.time())
        log.warning("generation %d of site %s ended: %s", gen.generation, gen.site, reason)
        self._notify()

    def form_generation(self, min_workers: int, *, at_least: int = 1,
                        site: str = DEFAULT_SITE) -> GenerationRow | None:
        """The active generation of ``site``, or a new one (numbered ``at_least`` or more) of
        every alive worker of ``site`` if at least ``min_workers`` are alive and none is active;
        None otherwise."""
        gen = self.store.current_generation(site)
        if gen is not None:
            return gen
        alive = self.store.workers("alive", site=site)
        if len(alive) < min_workers:
            return None
        number = max(self.store.last_generation() + 1, at_least)
        if number > MAX_GENERATION:  # refused, never wrapped: numbers must only rise
            log.error("generation %d would pass the limit %d; refusing to form it", number,
                      MAX_GENERATION)
            raise Refusal(409, f"generation: {number} would pass the limit {MAX_GENERATION}; "
                               f"the store {self.store.path} has spent its generation numbers")
        gen = self.store.create_generation(alive, now=time.time(), at_least=number, site=site)
        log.info("generation %d of site %s formed: %s", gen.generation, site,
                 ", ".join(f"{m.rank}={m.worker_id}" for m in gen.members))
        self._notify()
        return gen
