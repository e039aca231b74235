"""Dependency aliases the routes share: the app's coordinator, barrier, islands, registry and
progress board; the worker-id and site parameters; the bearer scheme."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry
from pydantic import AfterValidator

from coordinator.barrier import Barrier
from coordinator.fields import DEFAULT_SITE, SITE_PATTERN, WORKER_ID_PATTERN
from coordinator.identities import Identities
from coordinator.islands import Islands
from coordinator.progress import ProgressBoard
from coordinator.roles import EVERYONE, Principal
from coordinator.service import Coordinator


async def _coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


async def _barrier(request: Request) -> Barrier:
    return request.app.state.barrier


async def _islands(request: Request) -> Islands:
    return request.app.state.islands


async def _registry(request: Request) -> CollectorRegistry:
    return request.app.state.registry


async def _progress(request: Request) -> ProgressBoard:
    return request.app.state.progress


async def _identities(request: Request) -> Identities | None:
    return request.app.state.identities


async def _principal(request: Request) -> Principal:
    """Who the door (coordinator.guard) authenticated the request as."""
    return getattr(request.state, "principal", EVERYONE)


IdentitiesDep = Annotated[Identities | None, Depends(_identities)]
PrincipalDep = Annotated[Principal, Depends(_principal)]
CoordinatorDep = Annotated[Coordinator, Depends(_coordinator)]
BarrierDep = Annotated[Barrier, Depends(_barrier)]
IslandsDep = Annotated[Islands, Depends(_islands)]
RegistryDep = Annotated[CollectorRegistry, Depends(_registry)]
ProgressDep = Annotated[ProgressBoard, Depends(_progress)]
WorkerIdPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN, max_length=128)]
# Optional filters: empty (``?worker_id=``) means none, as a form left blank would send; the
# routes see None for both.
WorkerIdQuery = Annotated[str | None, Query(pattern=f"^$|{WORKER_ID_PATTERN}", max_length=128),
                          AfterValidator(lambda v: v or None)]
# ``?site=`` for the per-site views; the default site is the one workers without one are in.
SiteQuery = Annotated[str, Query(pattern=SITE_PATTERN, max_length=64,
                                 description=f"the site (island); default {DEFAULT_SITE!r}")]
# The door (coordinator.guard) checks the token; this only publishes the scheme in the OpenAPI
# schema, so clients and fuzzers know every route but /healthz takes a bearer token.
BEARER = [Security(HTTPBearer(auto_error=False, description="the coordinator's --token"))]
