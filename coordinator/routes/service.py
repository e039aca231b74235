"""The training service: clients create sessions, queue operations and await results;
serving workers take operations in order and post one result each (coordinator/sessions.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from coordinator.config import MAX_WAIT_S
from coordinator.deps import BEARER, PrincipalDep
from coordinator.responses import AUTHED, WITH_BODY, refusals
from coordinator.roles import acts_for
from coordinator.sessions import Sessions
from zerop2p.requests import (
    SESSION_ID_PATTERN,
    BaseRequest,
    NextOperation,
    OperationRecord,
    OperationRequest,
    ResultRequest,
    ResumePoint,
    SessionRecord,
    SessionRequest,
)

router = APIRouter(prefix="/service", tags=["service"], dependencies=BEARER)


async def _sessions(request: Request) -> Sessions:
    return request.app.state.sessions


SessionsDep = Annotated[Sessions, Depends(_sessions)]
SessionPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, max_length=64)]
SeqPath = Annotated[int, Path(ge=0, le=2**53)]
WaitQuery = Annotated[float, Query(ge=0, le=MAX_WAIT_S)]
WHY = {404: "unknown session or operation",
       409: "the poster is not a member of an active generation (results and bases), the "
            "session's model source is ambiguous (base_model and from_state: exactly "
            "one), a result body with both or neither of result and error, the session "
            "exists with another configuration, the seq is not the next one or holds another "
            "body, the model is not built yet, or the operation is not queued"}


@router.post("/sessions", responses=refusals(*WITH_BODY, 403, 409, why=WHY))
async def create_session(body: SessionRequest, sessions: SessionsDep) -> SessionRecord:
    """Create a session (idempotent for the same id and configuration); its operation 0
    builds the model on the serving workers."""
    return sessions.create(body)


@router.get("/sessions/{session_id}", responses=refusals(*AUTHED, 403, 404, 422, why=WHY))
async def get_session(session_id: SessionPath, sessions: SessionsDep) -> SessionRecord:
    return sessions.session(session_id)


@router.post("/sessions/{session_id}/ops", responses=refusals(*WITH_BODY, 403, 404, 409, why=WHY))
async def submit(session_id: SessionPath, body: OperationRequest,
                 sessions: SessionsDep) -> OperationRecord:
    """Queue the session's next operation; a retry of a queued one answers its record."""
    return sessions.submit(session_id, body)


@router.get("/sessions/{session_id}/ops/{seq}",
            responses=refusals(*AUTHED, 403, 404, 422, why=WHY))
async def operation(session_id: SessionPath, seq: SeqPath, sessions: SessionsDep,
                    wait: WaitQuery = 0.0) -> OperationRecord:
    """The operation's record; ``wait`` holds the request (up to 60 s) until it finishes."""
    return await sessions.wait(session_id, seq, wait)


@router.delete("/sessions/{session_id}/ops/{seq}",
               responses=refusals(*AUTHED, 403, 404, 409, 422, why=WHY))
async def cancel(session_id: SessionPath, seq: SeqPath, sessions: SessionsDep) -> OperationRecord:
    """Cancel a queued operation (409 once a worker has taken it)."""
    return sessions.cancel(session_id, seq)


@router.get("/states", responses=refusals(*AUTHED, 403, 422))
async def states(sessions: SessionsDep,
                 session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN)] = None
                 ) -> list[dict]:
    """Saved states (path, bytes, content hash, step), of one session or all."""
    return sessions.rows.states(session_id)


@router.get("/next", responses=refusals(*AUTHED, 403, 422))
async def next_operation(sessions: SessionsDep,
                         after: Annotated[int, Query(ge=0, le=2**53)] = 0,
                         wait: WaitQuery = 0.0) -> NextOperation:
    """For serving workers: the first operation after id ``after`` that is not cancelled
    (taken: no longer cancellable), with its session; none after ``wait`` s."""
    return await sessions.next(after, wait)


@router.get("/resume", responses=refusals(*AUTHED, 403))
async def resume(sessions: SessionsDep) -> ResumePoint:
    """Where a (re-)formed serving group starts reading: before every session's first
    operation past its saved base."""
    return ResumePoint(after=sessions.rows.resume_point())


@router.post("/ops/{op_id}/result", responses=refusals(*WITH_BODY, 403, 404, 409, why=WHY))
async def post_result(op_id: Annotated[int, Path(ge=1, le=2**53)], body: ResultRequest,
                      sessions: SessionsDep, principal: PrincipalDep) -> OperationRecord:
    """A worker's result (or error) for an operation; the first one posted wins."""
    acts_for(principal, body.worker_id)
    return sessions.finish(op_id, body)


@router.post("/sessions/{session_id}/base",
             responses=refusals(*WITH_BODY, 403, 404, 409, why=WHY))
async def set_base(session_id: SessionPath, body: BaseRequest, sessions: SessionsDep,
                   principal: PrincipalDep) -> SessionRecord:
    """A worker's clean saved state covering the session's operations up to ``seq``."""
    acts_for(principal, body.worker_id)
    return sessions.set_base(session_id, body)
