"""Per-step telemetry from workers: append, and read back the recent rows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.deps import BEARER, CoordinatorDep, PrincipalDep, WorkerIdQuery
from coordinator.models import Message, TelemetryRequest, TelemetryRow
from coordinator.responses import AUTHED, WITH_BODY, refusals
from coordinator.roles import acts_for

router = APIRouter(prefix="/telemetry", tags=["telemetry"], dependencies=BEARER)


@router.post("", responses=refusals(*WITH_BODY, 403, 404))
async def report(body: TelemetryRequest, coord: CoordinatorDep,
                 principal: PrincipalDep) -> Message:
    """Store one row of numeric metrics for a registered worker."""
    acts_for(principal, body.worker_id)
    coord.telemetry(body.worker_id, body.metrics())
    return Message(message="stored")


@router.get("", responses=refusals(*AUTHED, 403, 422))
async def recent(coord: CoordinatorDep, worker_id: WorkerIdQuery = None,
           limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[TelemetryRow]:
    """The newest ``limit`` rows, oldest first, of one worker or of all."""
    return [TelemetryRow(worker_id=w, ts=ts, metrics=m)
            for w, ts, m in coord.store.telemetry(worker_id, limit)]
