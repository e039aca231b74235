"""TLS mode only (the app includes this router when it has a CA): the CA certificate, open to
all (workers pin its SHA-256), and the renewal of a worker's certificate."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from coordinator.authority import CertificateAuthority
from coordinator.deps import BEARER, CoordinatorDep, IdentitiesDep, WorkerIdPath
from coordinator.errors import invalid_field
from coordinator.models import CertificateOut, CertificateRequest
from coordinator.responses import WITH_BODY, refusals
from coordinator.service import Refusal

router = APIRouter(tags=["identity"])
PEM_TYPE = "application/x-pem-file"


@router.get("/ca", response_class=Response, responses={200: {
    "description": "the cluster CA's certificate (PEM); compare its SHA-256 with the "
                   "fingerprint the coordinator printed",
    "content": {PEM_TYPE: {"schema": {"type": "string"}}}}})
async def ca_certificate(identities: IdentitiesDep) -> Response:
    """The CA certificate: public, so it needs no token."""
    return Response(identities.authority.ca_pem, media_type=PEM_TYPE)


@router.post("/workers/{worker_id}/certificate", dependencies=BEARER,
             responses=refusals(*WITH_BODY, 403, 404))
async def renew(worker_id: WorkerIdPath, body: CertificateRequest, coord: CoordinatorDep,
                identities: IdentitiesDep) -> CertificateOut:
    """A fresh certificate for the worker (its own credential only) over the CSR's key."""
    try:
        csr = CertificateAuthority.read_csr(body.csr)
    except ValueError as exc:
        raise invalid_field(("body", "csr"), str(exc)) from None
    if coord.store.worker(worker_id) is None:
        raise Refusal(404, f"unknown worker {worker_id!r}: register first")
    certificate, not_after = identities.certify(worker_id, csr)
    return CertificateOut(certificate=certificate, not_after=not_after)
