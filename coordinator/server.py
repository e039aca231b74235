"""Runs the coordinator under uvicorn on a socket it binds itself (port 0: a free port)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

import uvicorn

from coordinator.app import create_app
from coordinator.config import Settings

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


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_coordinator(*, host: str | None = None, port: int | None = None, db: str | None = None,
                    token: str | None = None, heartbeat_timeout: float | None = None,
                    log_level: str | None = None) -> None:
    """Serve until interrupted. Prints ``coordinator listening on URL`` once, on stdout.

    An option left None comes from ``$ZEROP2P_<NAME>`` or the Settings default (the defaults
    live there alone). Without a token every route is open.
    """
    given = {"host": host, "port": port, "db": db, "token": token,
             "heartbeat_timeout": heartbeat_timeout, "log_level": log_level}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})
    host, port, token, log_level = (settings.host, settings.port, settings.token,
                                    settings.log_level)
    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2, lifespan="on")
    print(f"coordinator listening on {url_of(host, actual)}", flush=True)
    if not token:
        log.warning("no token set: every route is open to anyone who can reach %s:%d",
                    host, actual)
    if not _loopback(host):
        log.warning("serving plain HTTP on %s:%d: the token and every request travel "
                    "unencrypted to anyone on the path", host, actual)
    uvicorn.Server(config).run(sockets=[sock])


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False
