"""The door: bearer-token auth and a body-size cap, checked before any route or parser runs."""

from __future__ import annotations

import hmac
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/"})  # "/" is a static page that holds no data


async def _refuse(send: Send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: 401 without the right ``Authorization: Bearer`` token (when one is
    set), 413 for bodies over ``max_body`` bytes; both before the body is parsed."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            problem = self._auth_problem(headers.get(b"authorization"))
            if problem:
                await _refuse(send, 401, problem, [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _refuse(send, 413, f"body: request body is larger than {self.max_body} bytes")
            return
        messages: list[Message] = []
        size = 0
        while True:  # buffer the (small) body so a chunked upload is capped too
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_body:
                await _refuse(send, 413, f"body: request body is larger than {self.max_body} bytes")
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _auth_problem(self, header: bytes | None) -> str | None:
        if not header:
            return "missing credentials: send 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            return "authorization: expected 'Bearer <token>'"
        if not hmac.compare_digest(given.strip(), self.token):
            return "authorization: wrong token"
        return None
