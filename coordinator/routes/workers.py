"""Worker registry routes: register, heartbeat, leave, list."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.deps import BEARER, CoordinatorDep, WorkerIdPath
from coordinator.models import HeartbeatRequest, Message, RegisterRequest, WorkerOut
from coordinator.responses import AUTHED, WITH_BODY, refusals

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=BEARER)


@router.post("/register", responses=refusals(*WITH_BODY))
async def register(body: RegisterRequest, coord: CoordinatorDep) -> Message:
    """Add a worker, or update a restarted one's address and site and mark it alive."""
    info = body.model_dump(exclude={"worker_id", "ip_address", "port", "device", "site",
                                    "outer_port"}, exclude_none=True)
    known = coord.register(body.worker_id, ip_address=body.ip_address, port=body.port,
                           device=body.device, info=info, site=body.site,
                           outer_port=body.outer_port)
    return Message(message=f"{body.worker_id} {'re-registered' if known else 'registered'}")


@router.post("/{worker_id}/heartbeat", responses=refusals(*WITH_BODY, 404, 409))
async def heartbeat(worker_id: WorkerIdPath, coord: CoordinatorDep,
              body: HeartbeatRequest | None = None) -> Message:
    """Keep an alive worker alive; 404 if unknown, 409 if dead or left (register again)."""
    status = body.model_dump(exclude_none=True) if body else {}
    coord.heartbeat(worker_id, status)
    return Message(message="ok")


@router.delete("/{worker_id}", responses=refusals(*AUTHED, 404, 422))
async def leave(worker_id: WorkerIdPath, coord: CoordinatorDep) -> Message:
    """Graceful leave: the worker is marked left and its generation, if any, ends."""
    coord.leave(worker_id)
    return Message(message=f"{worker_id} left")


@router.get("", responses=refusals(*AUTHED))
async def workers(coord: CoordinatorDep) -> list[WorkerOut]:
    """Every worker ever registered, with status, last heartbeat and address."""
    return [WorkerOut.model_validate(w) for w in coord.store.workers()]
