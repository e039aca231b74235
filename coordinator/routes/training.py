"""The training-ready barrier and a read-only view of the current generation, per site."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.config import MAX_WAIT_S
from coordinator.deps import BEARER, BarrierDep, CoordinatorDep, SiteQuery, WorkerIdQuery
from coordinator.fields import DEFAULT_SITE, MAX_GENERATION, MAX_WORKERS
from coordinator.models import GenerationOut, PeerOut, ReadyResponse
from coordinator.responses import AUTHED, refusals

router = APIRouter(prefix="/training", tags=["training"], dependencies=BEARER)


@router.get("/ready", responses=refusals(*AUTHED, 403, 409, 422))
async def ready(barrier: BarrierDep,
                min_workers: Annotated[int, Query(ge=1, le=MAX_WORKERS)],
                wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
                worker_id: WorkerIdQuery = None,
                after: Annotated[int | None, Query(ge=0, le=MAX_GENERATION)] = None,
                site: SiteQuery = DEFAULT_SITE) -> ReadyResponse:
    """``site``'s barrier (see ``coordinator.barrier``). ``wait`` long-polls up to 60 s;
    ``worker_id`` makes a non-member see ready false; ``after`` asks for a newer generation.
    409 if a generation is due but the numbers are spent (``MAX_GENERATION``)."""
    return await barrier.ready(min_workers, wait=wait, worker_id=worker_id, after=after,
                               site=site)


@router.get("/generation", responses=refusals(*AUTHED, 403, 422))
async def generation(coord: CoordinatorDep, site: SiteQuery = DEFAULT_SITE) -> GenerationOut:
    """``site``'s active generation and its members, without forming one (for dashboards)."""
    gen = coord.store.current_generation(site)
    return GenerationOut(generation=gen.generation if gen else None,
                         last_generation=coord.store.last_generation(), site=site,
                         workers=[PeerOut.model_validate(m) for m in gen.members] if gen else [])
