"""The door: bearer-token auth, roles (TLS mode) and a body-size cap, checked before any route
or parser runs."""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.identities import Identities
from coordinator.roles import EVERYONE, Principal, Role, denied

log = logging.getLogger(__name__)

# The dashboard ("/" and its script, styles and chart library under /static/) holds no data: its
# script reads the authenticated routes with the token the user gives it.
STATIC = Path(__file__).resolve().parent / "static"
OPEN_PATHS = frozenset({"/healthz", "/", *(f"/static/{f.name}" for f in STATIC.iterdir()
                                           if f.is_file() and f.name != "index.html")})
TLS_OPEN_PATHS = OPEN_PATHS | {"/ca"}  # the CA certificate is public (workers pin its hash)


async def _refuse(send: Send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: 401 without the right ``Authorization: Bearer`` token (when one is
    set), 413 for bodies over ``max_body`` bytes; both before the body is parsed. With
    ``identities`` (TLS mode) the token may also be the admin token or a worker credential,
    and roles.py's rules answer 403; the request's ``Principal`` is left in its state."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int,
                 identities: Identities | None = None, admin_token: str | None = None,
                 large_bodies: tuple[str, int] | None = None) -> None:
        """``large_bodies``: (path prefix, cap) for routes whose bodies carry data."""
        self.app = app
        self.large_bodies = large_bodies
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.identities = identities
        self.admin = admin_token.encode() if admin_token else None
        self.open_paths = OPEN_PATHS if identities is None else TLS_OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        principal = EVERYONE
        if scope["path"] not in self.open_paths:
            if self.identities is not None:
                principal, problem = self._identify(headers.get(b"authorization"))
            else:
                problem = self.token and self._auth_problem(headers.get(b"authorization"))
            if problem:
                await _refuse(send, 401, problem, [(b"www-authenticate", b"Bearer")])
                return
            why = principal and denied(principal, scope["method"], scope["path"],
                                       admin_configured=self.admin is not None)
            if why:
                log.warning("refused %s %s: %s", scope["method"], scope["path"], why)
                await _refuse(send, 403, why)
                return
        scope.setdefault("state", {})["principal"] = principal
        cap = self.max_body
        if self.large_bodies and scope["path"].startswith(self.large_bodies[0]):
            cap = self.large_bodies[1]
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            await _refuse(send, 413, f"body: request body is larger than {cap} bytes")
            return
        messages: list[Message] = []
        size = 0
        while True:  # buffer the (small) body so a chunked upload is capped too
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > cap:
                await _refuse(send, 413, f"body: request body is larger than {cap} bytes")
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _identify(self, header: bytes | None) -> tuple[Principal | None, str | None]:
        """TLS mode: the admin token, the join token or a worker credential (roles.py)."""
        if not header:
            if self.token is None:  # no join token set: anyone may register (warned at start)
                return Principal(Role.JOIN), None
            return None, "missing credentials: send 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(b" ")
        given = given.strip()
        if scheme.lower() != b"bearer" or not given:
            return None, "authorization: expected 'Bearer <token>'"
        if self.admin is not None and hmac.compare_digest(given, self.admin):
            return Principal(Role.ADMIN), None
        if self.token is not None and hmac.compare_digest(given, self.token):
            return Principal(Role.JOIN), None
        owner = self.identities.owner(given)
        if owner is not None:
            return Principal(Role.WORKER, owner), None
        return None, "authorization: not the join token, the admin token or a worker's credential"

    def _auth_problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing credentials: send 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            return "authorization: expected 'Bearer <token>'"
        if not hmac.compare_digest(given.strip(), self.token):
            return "authorization: wrong token"
        return None
