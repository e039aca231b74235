"""Worker registry routes: register, heartbeat, leave, list."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.authority import CertificateAuthority
from coordinator.deps import BEARER, CoordinatorDep, IdentitiesDep, PrincipalDep, WorkerIdPath
from coordinator.errors import invalid_field
from coordinator.models import HeartbeatRequest, Message, Registered, RegisterRequest, WorkerOut
from coordinator.responses import AUTHED, WITH_BODY, refusals
from coordinator.roles import Role

router = APIRouter(prefix="/workers", tags=["workers"], dependencies=BEARER)

REGISTER_WHY = {409: "TLS mode: the worker id is held by another identity (coordinator/roles.py)",
                403: "TLS mode: a worker credential naming another id"}


@router.post("/register", responses=refusals(*WITH_BODY, 403, 409, why=REGISTER_WHY))
async def register(body: RegisterRequest, coord: CoordinatorDep, identities: IdentitiesDep,
                   principal: PrincipalDep) -> Registered:
    """Add a worker, or update a restarted one's address and site and mark it alive. In TLS
    mode a new id gets its credential, and a ``csr`` a certificate for the id."""
    info = body.model_dump(exclude={"worker_id", "ip_address", "port", "device", "site",
                                    "outer_port", "csr"}, exclude_none=True)
    csr = claim = None
    if identities is not None:  # everything that may refuse runs before anything is written
        if body.csr is not None:
            try:
                csr = CertificateAuthority.read_csr(body.csr)
            except ValueError as exc:
                raise invalid_field(("body", "csr"), str(exc)) from None
        claim = identities.admit(body.worker_id, principal)
    known = coord.register(body.worker_id, ip_address=body.ip_address, port=body.port,
                           device=body.device, info=info, site=body.site,
                           outer_port=body.outer_port)
    answer = Registered(message=f"{body.worker_id} {'re-registered' if known else 'registered'}")
    if claim:
        answer.credential = identities.issue(body.worker_id)
    if csr is not None:
        answer.certificate, answer.not_after = identities.certify(body.worker_id, csr)
    return answer


@router.post("/{worker_id}/heartbeat", responses=refusals(*WITH_BODY, 403, 404, 409))
async def heartbeat(worker_id: WorkerIdPath, coord: CoordinatorDep,
              body: HeartbeatRequest | None = None) -> Message:
    """Keep an alive worker alive; 404 if unknown, 409 if dead or left (register again)."""
    status = body.model_dump(exclude_none=True) if body else {}
    coord.heartbeat(worker_id, status)
    return Message(message="ok")


@router.delete("/{worker_id}", responses=refusals(*AUTHED, 403, 404, 422))
async def leave(worker_id: WorkerIdPath, coord: CoordinatorDep, identities: IdentitiesDep,
                principal: PrincipalDep) -> Message:
    """Graceful leave: the worker is marked left and its generation, if any, ends. In TLS
    mode the admin's DELETE also revokes the worker's credential (the id is free again)."""
    coord.leave(worker_id)
    if identities is not None and principal.role is Role.ADMIN:
        identities.revoke(worker_id)
    return Message(message=f"{worker_id} left")


@router.get("", responses=refusals(*AUTHED, 403))
async def workers(coord: CoordinatorDep) -> list[WorkerOut]:
    """Every worker ever registered, with status, last heartbeat and address."""
    return [WorkerOut.model_validate(w) for w in coord.store.workers()]
