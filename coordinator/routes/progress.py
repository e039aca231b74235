"""Who is stuck: members' progress reports in, and the site's status out (coordinator/progress.py)."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.deps import BEARER, PrincipalDep, ProgressDep, SiteQuery
from coordinator.fields import DEFAULT_SITE
from coordinator.models import Message
from coordinator.progress_models import ProgressRequest, StatusResponse
from coordinator.responses import AUTHED, WITH_BODY, refusals
from coordinator.roles import acts_for

router = APIRouter(prefix="/training", tags=["training"], dependencies=BEARER)
NOT_A_MEMBER = {409: "the worker is not that rank of its site's active generation"}


@router.post("/progress", responses=refusals(*WITH_BODY, 403, 404, 409, why=NOT_A_MEMBER))
async def progress(body: ProgressRequest, board: ProgressDep, principal: PrincipalDep) -> Message:
    """Where a member's training thread is and what it waits for (sent by the trainer about
    every second); 404 if the worker is unknown, 409 if it is not that rank of its site's
    active generation (a report of an ended generation)."""
    acts_for(principal, body.worker_id)  # TLS mode: a worker reports for itself only
    board.record(body)
    return Message(message="recorded")


@router.get("/status", responses=refusals(*AUTHED, 403, 422))
async def status(board: ProgressDep, site: SiteQuery = DEFAULT_SITE) -> StatusResponse:
    """``site``'s active generation rank by rank: position, silence, what each waits for; the
    ranks stalled (silent for ``stall_after`` s while others reported); one sentence saying
    who is stuck on what."""
    return board.status(site)
