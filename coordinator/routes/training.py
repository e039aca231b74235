"""The training-ready barrier and a read-only view of the current generation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.deps import BarrierDep, CoordinatorDep, WorkerIdQuery
from coordinator.models import PeerOut, ReadyResponse

router = APIRouter(prefix="/training", tags=["training"])


@router.get("/ready")
async def ready(barrier: BarrierDep,
                min_workers: Annotated[int, Query(ge=1, le=100_000)],
                wait: Annotated[float, Query(ge=0, le=3600)] = 0.0,
                worker_id: WorkerIdQuery = None,
                after: Annotated[int | None, Query(ge=0)] = None) -> ReadyResponse:
    """The barrier (see ``coordinator.barrier``). ``wait`` long-polls up to 60 s;
    ``worker_id`` makes a non-member see ready false; ``after`` asks for a newer generation."""
    return await barrier.ready(min_workers, wait=wait, worker_id=worker_id, after=after)


@router.get("/generation")
async def generation(coord: CoordinatorDep) -> dict:
    """The active generation and its members, without forming one (for dashboards)."""
    gen = coord.store.current_generation()
    return {"generation": gen.generation if gen else None,
            "last_generation": coord.store.last_generation(),
            "workers": [PeerOut.model_validate(m) for m in gen.members] if gen else []}
