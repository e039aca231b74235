"""A TCP mesh that names a dead peer: the kernel closes a killed process's sockets, so every
survivor sees end-of-file on its connection to that rank within milliseconds.

torch.distributed reports a lost peer as an opaque socket error; this mesh turns it into the
rank and address the Failure model asks for. Each rank listens, publishes its address in the
store, connects to every other rank and watches those connections with one selector thread.
A clean ``close`` writes a goodbye byte first, so a peer that leaves is not mistaken for lost.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading

log = logging.getLogger(__name__)

_BYE = b"B"


def local_ip_towards(host: str) -> str:
    """The local address this machine uses to reach ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class LivenessMesh:
    """Every rank holds a socket to every other; EOF without goodbye means that rank died."""

    def __init__(self, *, rank: int, world_size: int, store, host: str, timeout: float,
                 prefix: str = "zerop2p/live"):
        self.rank = rank
        self._lost: tuple[int, str] | None = None
        self._lost_event = threading.Event()
        self._closed = False
        ip = local_ip_towards(host)
        self._listener = socket.create_server((ip, 0))
        self._listener.settimeout(timeout)
        address = f"{ip}:{self._listener.getsockname()[1]}"
        store.set(f"{prefix}/{rank}", address)
        others = [r for r in range(world_size) if r != rank]
        self._accepted: list[socket.socket] = []
        acceptor = threading.Thread(target=self._accept, args=(len(others),), daemon=True)
        acceptor.start()
        self._watched: dict[socket.socket, tuple[int, str]] = {}
        for r in others:
            addr = store.get(f"{prefix}/{r}").decode()
            peer_host, _, peer_port = addr.rpartition(":")
            conn = socket.create_connection((peer_host, int(peer_port)), timeout=timeout)
            conn.setblocking(False)
            self._watched[conn] = (r, addr)
        acceptor.join(timeout)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        for conn in self._watched:
            self._selector.register(conn, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._watch, name=f"liveness-r{rank}",
                                        daemon=True)
        self._thread.start()

    def _accept(self, count: int) -> None:
        try:
            for _ in range(count):
                conn, _ = self._listener.accept()
                self._accepted.append(conn)
        except OSError as exc:
            log.warning("rank %d: liveness mesh accepted %d of %d peers: %s", self.rank,
                        len(self._accepted), count, exc)

    def _watch(self) -> None:
        while True:
            for sel_key, _ in self._selector.select():
                sock = sel_key.fileobj
                if sock is self._wake_r:
                    return
                try:
                    data = sock.recv(1)
                except OSError:
                    data = b""
                rank, address = self._watched[sock]
                self._selector.unregister(sock)
                if data != _BYE and not self._closed:
                    log.warning("rank %d: peer rank %d at %s is gone", self.rank, rank, address)
                    if self._lost is None:
                        self._lost = (rank, address)
                    self._lost_event.set()

    @property
    def lost(self) -> tuple[int, str] | None:
        """The first rank seen to die, with its address, or None while all are alive."""
        return self._lost

    def wait_lost(self, timeout: float) -> tuple[int, str] | None:
        """Wait up to ``timeout`` for a loss to be seen (an op error usually comes first)."""
        self._lost_event.wait(timeout)
        return self._lost

    def close(self) -> None:
        """Say goodbye to every peer and stop watching."""
        if self._closed:
            return
        self._closed = True
        for conn in self._accepted:
            try:
                conn.sendall(_BYE)
            except OSError:
                pass
            conn.close()
        self._wake_w.send(b"x")
        self._thread.join(5.0)
        for conn in self._watched:
            conn.close()
        self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
