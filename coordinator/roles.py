"""Who may do what, once the coordinator issues identities (TLS on).

[Note: roles]
Three credentials, each an ``Authorization: Bearer`` token, told apart by the door (guard.py):
- the **join token** (``--token``): registers a worker id that no one holds yet, nothing else;
- a **worker credential**: a random 256-bit token the coordinator hands out when it registers
  a new id (only its SHA-256 is stored). It acts on its own id only: re-register, heartbeat,
  leave, telemetry, outer rounds, certificate renewal; and it reads what a member needs (the
  barrier, the generation, decided rounds);
- the **admin token** (``--admin-token-file`` / ``$ZEROP2P_ADMIN_TOKEN``): everything,
  deleting any worker (which also revokes its credential, so the id can be registered anew)
  and reading everything (workers, telemetry, metrics, any route not listed below).
A bearer token, not the worker's client certificate, because the coordinator's HTTPS server
(uvicorn) does not hand the peer certificate to the app; the token travels only inside TLS.
Without TLS (plain mode, loopback development) there are no roles: the one token does all.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from coordinator.service import Refusal


class Role(str, enum.Enum):
    ADMIN = "admin"
    JOIN = "join"
    WORKER = "worker"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request was authenticated as; ``worker_id`` for a worker credential."""

    role: Role
    worker_id: str | None = None

    def __str__(self) -> str:
        if self.role is Role.WORKER:
            return f"worker {self.worker_id!r}'s credential"
        return f"the {self.role.value} token"


EVERYONE = Principal(Role.ADMIN)  # plain mode: the one token (or none) may do everything


class Who(enum.Enum):
    ANYONE = "any credential"  # the route itself checks the body's worker id
    SELF = "the worker's own credential or the admin token"
    MEMBERS = "a worker credential or the admin token"


# (methods, path): who may call it; the first match wins, and any route not listed (dashboards'
# reads, metrics, the schema, routes added later) is the admin's alone.
RULES: tuple[tuple[frozenset[str], re.Pattern, Who], ...] = tuple(
    (frozenset(methods.split()), re.compile(path), who) for methods, path, who in (
        ("POST", r"/workers/register", Who.ANYONE),
        ("POST", r"/workers/(?P<id>[^/]+)/(heartbeat|certificate)", Who.SELF),
        ("DELETE", r"/workers/(?P<id>[^/]+)", Who.SELF),
        ("POST", r"/telemetry", Who.MEMBERS),
        ("POST", r"/training/progress", Who.MEMBERS),
        ("POST", r"/islands/rounds/[^/]+", Who.MEMBERS),
        ("GET HEAD", r"/training/(ready|generation)", Who.MEMBERS),
        ("GET HEAD", r"/islands/rounds", Who.MEMBERS),
        ("GET HEAD", r"/service/(next|resume)", Who.MEMBERS),  # serving workers; clients
        ("POST", r"/service/(ops/[^/]+/result|sessions/[^/]+/base)", Who.MEMBERS),  # are admin
    ))


def denied(principal: Principal, method: str, path: str, *, admin_configured: bool) -> str | None:
    """Why ``principal`` may not call ``method path`` (None: it may)."""
    if principal.role is Role.ADMIN:
        return None
    for methods, pattern, who in RULES:
        match = pattern.fullmatch(path)
        if match is None or method not in methods:
            continue
        if who is Who.ANYONE:
            return None
        if principal.role is Role.JOIN:
            return f"{method} {path}: {principal} only registers new workers; this needs {who.value}"
        if who is Who.SELF and match["id"] != principal.worker_id:
            return (f"{method} {path}: {principal} acts only on its own id, not on "
                    f"{match['id']!r} (the admin token may)")
        return None
    admin = "" if admin_configured else (" (none is configured: --admin-token-file or "
                                         "$ZEROP2P_ADMIN_TOKEN)")
    return f"{method} {path}: needs the admin token{admin}, not {principal}"


def acts_for(principal: Principal, worker_id: str) -> None:
    """Refuse (403) a worker credential acting on another id named in a request body."""
    if principal.role is Role.WORKER and principal.worker_id != worker_id:
        raise Refusal(403, f"{principal} acts only on its own id, not on {worker_id!r}")
    if principal.role is Role.JOIN:
        raise Refusal(403, f"{principal} only registers new workers, not acting for "
                           f"{worker_id!r}")
