"""Runs the coordinator under uvicorn on a socket it binds itself (port 0: a free port)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any

import uvicorn

from coordinator.app import create_app
from coordinator.authority import AuthorityError
from coordinator.config import Settings
from coordinator.tls import authority_from

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; reusable so a restart can take the same port.

    The explicit IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only
    when the protocol says TCP, and without it every keep-alive response waits ~40 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int, *, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def run_coordinator(*, host: str | None = None, port: int | None = None, db: str | None = None,
                    token: str | None = None, heartbeat_timeout: float | None = None,
                    log_level: str | None = None, stall_after: float | None = None,
                    **tls_options: Any) -> None:
    """Serve until interrupted. Prints ``coordinator listening on URL`` once, on stdout, then
    with TLS ``coordinator CA fingerprint sha256:HEX``.

    An option left None comes from ``$ZEROP2P_<NAME>`` or the Settings default (the defaults
    live there alone). Without a token every route is open. ``tls_options`` are the TLS and
    roles settings (``tls``, ``tls_dir``, ``tls_cert`` ..., ``admin_token``, ``cert_lifetime``).
    """
    given = {"host": host, "port": port, "db": db, "token": token,
             "heartbeat_timeout": heartbeat_timeout, "log_level": log_level,
             "stall_after": stall_after, **tls_options}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    host, port, token, log_level = (settings.host, settings.port, settings.token,
                                    settings.log_level)
    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    try:
        authority = authority_from(settings)
    except AuthorityError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    app = create_app(settings, authority=authority)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    ssl = {} if authority is None else {"ssl_certfile": str(authority.server_cert_file),
                                        "ssl_keyfile": str(authority.server_key_file)}
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2, lifespan="on", **ssl)
    print(f"coordinator listening on {url_of(host, actual, tls=authority is not None)}",
          flush=True)
    if authority is not None:
        print(f"coordinator CA fingerprint sha256:{authority.fingerprint}", flush=True)
        log.info("serving HTTPS; CA %s, sha256 %s: workers join with --ca %s or "
                 "--ca-fingerprint %s", authority.ca_file, authority.fingerprint,
                 authority.ca_file, authority.fingerprint)
        if not settings.admin_token:
            log.warning("no admin token set ($ZEROP2P_ADMIN_TOKEN or --admin-token-file): no "
                        "one may delete other workers or read /workers, /telemetry, /metrics")
    if not token:
        log.warning("no %s set: %s anyone who can reach %s:%d",
                    "join token" if authority else "token",
                    "workers may be registered by" if authority else "every route is open to",
                    host, actual)
    if authority is None and not _loopback(host):
        log.warning("serving plain HTTP on %s:%d: the token and every request travel "
                    "unencrypted to anyone on the path", host, actual)
    uvicorn.Server(config).run(sockets=[sock])


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False
