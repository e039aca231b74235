"""Worker identities in TLS mode: who holds each worker id (its credential, roles.py's note),
and the certificates the CA signs for it.

Only a credential's SHA-256 is stored, so the database alone lets no one act as a worker. A
registration of an id someone holds, by anyone but its holder, is refused with 409 naming the id;
the admin's DELETE releases it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from cryptography import x509

from coordinator.authority import CertificateAuthority, pem_of
from coordinator.roles import Principal, Role
from coordinator.service import Refusal
from coordinator.store import Store

log = logging.getLogger(__name__)

CREDENTIAL_BYTES = 32


def digest(token: bytes | str) -> str:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).hexdigest()


class Identities:
    """Credentials in the store, certificates from the authority."""

    def __init__(self, store: Store, authority: CertificateAuthority, *, lifetime: float) -> None:
        self.store = store
        self.authority = authority
        self.lifetime = lifetime

    def owner(self, token: bytes) -> str | None:
        """The worker id a bearer token is the credential of (None: no worker's)."""
        return self.store.credential_owner(digest(token.strip()))

    def admit(self, worker_id: str, principal: Principal) -> bool:
        """Whether ``principal`` may register ``worker_id``; True when the id is unclaimed and
        a credential is to be issued, False for its holder re-registering. Refusal otherwise:
        409 for an id held by another identity, 403 for a worker credential naming another id."""
        held = self.store.credential(worker_id) is not None
        mine = principal.role is Role.WORKER and principal.worker_id == worker_id
        if held and not mine:
            raise Refusal(409, f"worker id {worker_id!r} is registered by another identity "
                               f"(not {principal}): re-register with its own credential, or "
                               f"have the admin delete it first")
        if principal.role is Role.WORKER and not mine:
            raise Refusal(403, f"{principal} may register only its own id, not {worker_id!r}")
        return not held

    def issue(self, worker_id: str) -> str:
        """A new credential for ``worker_id`` (only its hash is kept)."""
        token = secrets.token_urlsafe(CREDENTIAL_BYTES)
        self.store.set_credential(worker_id, digest(token))
        log.info("%s: issued a worker credential", worker_id)
        return token

    def revoke(self, worker_id: str) -> None:
        """Release ``worker_id``: its credential stops working, the id may be registered anew."""
        if self.store.credential(worker_id) is not None:
            self.store.set_credential(worker_id, None)
            log.warning("%s: credential revoked by the admin", worker_id)

    def certify(self, worker_id: str, csr: x509.CertificateSigningRequest) -> tuple[str, float]:
        """The PEM certificate for ``worker_id`` over ``csr``'s key, and when it ends (epoch s)."""
        cert = self.authority.sign_worker(csr, worker_id, lifetime=self.lifetime)
        not_after = cert.not_valid_after_utc.timestamp()
        log.info("%s: certificate issued until %s (serial %x)", worker_id,
                 cert.not_valid_after_utc.isoformat(timespec="seconds"), cert.serial_number)
        return pem_of(cert), not_after
