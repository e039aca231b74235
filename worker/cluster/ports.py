"""Free ports for local processes (torch.distributed's store, a worker's peer server)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now on ``host`` (it may be taken again before it is bound:
    use it for a store a child binds at once, never as a server's fixed port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
