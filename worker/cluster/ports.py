"""Free ports for local processes (torch.distributed's store, a worker's peer server), and
``HOST:PORT`` addresses."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now on ``host`` (it may be taken again before it is bound:
    use it for a store a child binds at once, never as a server's fixed port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) split; ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"advertise address {address!r} is not HOST:PORT with a port in "
                         "1..65535")
    return host, int(port)
