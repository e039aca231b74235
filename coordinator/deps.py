"""Dependency aliases the routes share: the app's coordinator, barrier and registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator

from coordinator.barrier import Barrier
from coordinator.models import WORKER_ID_PATTERN
from coordinator.service import Coordinator


async def _coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


async def _barrier(request: Request) -> Barrier:
    return request.app.state.barrier


async def _registry(request: Request) -> CollectorRegistry:
    return request.app.state.registry


CoordinatorDep = Annotated[Coordinator, Depends(_coordinator)]
BarrierDep = Annotated[Barrier, Depends(_barrier)]
RegistryDep = Annotated[CollectorRegistry, Depends(_registry)]
WorkerIdPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN, max_length=128)]
# Optional filters: empty (``?worker_id=``) means none, as a form left blank would send; the
# routes see None for both.
WorkerIdQuery = Annotated[str | None, Query(pattern=f"^$|{WORKER_ID_PATTERN}", max_length=128),
                          AfterValidator(lambda v: v or None)]
