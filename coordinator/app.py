"""Builds the coordinator's FastAPI app: store, rules, barrier, outer rounds, progress board,
monitor, routes, the door."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from coordinator import errors
from coordinator.authority import CertificateAuthority
from coordinator.barrier import Barrier
from coordinator.config import MAX_BODY_BYTES, MAX_SERVICE_BODY_BYTES, Settings
from coordinator.guard import Guard
from coordinator.identities import Identities
from coordinator.islands import Islands
from coordinator.metrics import make_registry
from coordinator.monitor import HeartbeatMonitor
from coordinator.progress import ProgressBoard
from coordinator.routes import identity, islands, ops, progress, service, telemetry, training, workers
from coordinator.service import Coordinator
from coordinator.session_store import SessionStore
from coordinator.sessions import Sessions
from coordinator.store import Store

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, authority: CertificateAuthority | None = None) -> FastAPI:
    """One coordinator app over the SQLite file (or ``:memory:``) in ``settings.db``; with an
    ``authority`` (TLS mode) it issues worker identities and enforces roles (roles.py)."""
    store = Store(settings.db)
    identities = (None if authority is None else
                  Identities(store, authority, lifetime=settings.cert_lifetime))
    coordinator = Coordinator(store, heartbeat_timeout=settings.heartbeat_timeout)
    board = ProgressBoard(store, stall_after=settings.stall_after)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Workers alive before a restart get a fresh grace period: the coordinator was away,
        # not them. The active generation, if any, carries on.
        revived = store.refresh_alive(time.time())
        active = store.active_numbers()
        log.info("coordinator up on %s: %d alive workers, generations %s, last outer round %d",
                 settings.db, revived,
                 ", ".join(f"{s}={g}" for s, g in sorted(active.items())) or "none",
                 store.last_round())
        monitor = HeartbeatMonitor(coordinator, board)
        monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            store.close()

    app = FastAPI(title="zerop2p coordinator", lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.coordinator = coordinator
    app.state.barrier = Barrier(coordinator, max_wait=settings.max_wait)
    app.state.islands = Islands(coordinator, max_wait=settings.max_wait)
    app.state.progress = board
    app.state.sessions = Sessions(SessionStore(store), max_wait=settings.max_wait)
    app.state.identities = identities
    app.state.registry = make_registry(coordinator, board)
    for module in (workers, training, progress, islands, telemetry, ops, service):
        app.include_router(module.router)
    if identities is not None:
        app.include_router(identity.router)
    errors.install(app)
    app.add_middleware(Guard, token=settings.token, max_body=MAX_BODY_BYTES,
                       large_bodies=("/service/", MAX_SERVICE_BODY_BYTES),
                       identities=identities, admin_token=settings.admin_token)
    return app
