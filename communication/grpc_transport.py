"""A worker's gRPC endpoint: an asyncio loop in a daemon thread running the peer server, the
accumulator and one client channel per peer address.

It is created before the worker registers (so the coordinator learns its port) and outlives
generations: ``GrpcCollectives.bind(transport, ...)`` binds it to one generation's ranks and peers,
and from then on contributions of older generations are refused.

With mutual TLS (``MutualTls``) a binding also names each rank's worker id: the server lets a
push in only from the certificate of its sender rank (identity.py), and a client channel checks
that the peer at an address holds the certificate of the worker expected there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from concurrent.futures import Future

from communication.accumulator import Accumulator
from communication.auth import TlsConfig
from communication.identity import SenderCheck, worker_dns_name
from communication.loop_thread import LoopThread
from communication.mtls import MutualTls
from communication.peer_client import PeerClient
from communication.peer_server import PeerServicer, create_server

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0  # close() lets sends awaiting their acknowledgement finish this long
KEEP_GENERATIONS = 4  # member ids kept for this many generations (a push names its own)


class GrpcTransport:
    """Owns the loop thread, the server and the peer channels of one worker process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 tls: TlsConfig | MutualTls | None = None):
        self.host = host
        self.token = token
        self.tls = tls
        self.generation = 0
        self.rank = -1
        self._members: dict[int, tuple[str, ...]] = {}  # generation -> worker id by rank
        self._expected: dict[str, str] = {}  # address -> the worker id serving it (mTLS)
        # address -> (client, certificate epoch, server name): a new epoch or a new worker at
        # the address gets a new channel
        self._clients: dict[str, tuple[PeerClient, int, str | None]] = {}
        self._retired: list[PeerClient] = []
        self._unacknowledged: set[asyncio.Task] = set()
        self._loop_thread = LoopThread("grpc-transport")
        self.loop = self._loop_thread.loop
        self.accumulator, self.servicer, self._server, self.port = self.call(
            self._start(host, port), timeout=START_TIMEOUT)
        self._closed = False
        _warn_if_open(host, self.port, token=token, tls=tls)

    @property
    def address(self) -> str:
        """host:port peers use to reach this transport."""
        return f"{self.host}:{self.port}"

    async def _start(self, host: str, port: int):
        acc = Accumulator(asyncio.get_running_loop())
        senders = (SenderCheck(self._members.get, lambda: self.rank)
                   if isinstance(self.tls, MutualTls) else None)
        servicer = PeerServicer(acc, rank=lambda: self.rank, generation=lambda: self.generation,
                                senders=senders)
        server, bound = await create_server(servicer, host=host, port=port, token=self.token,
                                            tls=self.tls)
        return acc, servicer, server, bound

    def submit(self, coro) -> Future:
        """Run a coroutine on the transport loop; a concurrent future for its result."""
        return self._loop_thread.submit(coro)

    def call(self, coro, *, timeout: float):
        """Run a coroutine on the loop and wait for it (from any other thread)."""
        return self.submit(coro).result(timeout=timeout)

    def client(self, address: str) -> PeerClient:
        """The one channel to address (created on first use, and again after a renewed
        certificate; loop thread only). With mutual TLS it accepts only the certificate of the
        worker the current generation has at ``address``."""
        epoch, name = 0, None
        if isinstance(self.tls, MutualTls):
            if address not in self._expected:
                raise ValueError(f"mutual TLS: no worker id is known for {address} in "
                                 f"generation {self.generation} (bind with members)")
            epoch, name = self.tls.epoch, worker_dns_name(self._expected[address])
        held = self._clients.get(address)
        if held is not None and held[1:] == (epoch, name):
            return held[0]
        if held is not None:  # sends may still use it: closed with the transport
            self._retired.append(held[0])
        client = PeerClient(address, token=self.token, tls=self.tls, server_name=name)
        self._clients[address] = (client, epoch, name)
        return client

    def hold(self, send: asyncio.Task) -> None:
        """Keep a send whose collective completed until its acknowledgement (loop thread);
        ``close`` waits for them, since closing a channel would cut bytes still queued."""
        self._unacknowledged.add(send)
        send.add_done_callback(self._unacknowledged.discard)

    def bind(self, *, rank: int, generation: int, members: list[str] | None = None,
             peers: list[str] | None = None) -> None:
        """Serve one generation as ``rank``; contributions from older generations are refused
        from now on (``GrpcCollectives.bind`` calls it). ``members``: the worker id of each
        rank, at the addresses ``peers`` (both needed with mutual TLS)."""
        if generation < self.generation:
            raise ValueError(f"generation {generation} is older than the current "
                             f"{self.generation}")
        if isinstance(self.tls, MutualTls) and (
                members is None or peers is None or len(members) != len(peers)):
            raise ValueError(f"mutual TLS: generation {generation} needs each rank's worker id "
                             f"and address (members {members}, peers {peers})")

        async def bind():
            if members is not None:
                self._members[generation] = tuple(members)
                for old in sorted(self._members)[:-KEEP_GENERATIONS]:
                    del self._members[old]
                self._expected = dict(zip(peers or (), members))
            self.rank, self.generation = rank, generation
            self.accumulator.drop_generations_below(generation)

        self.call(bind(), timeout=START_TIMEOUT)

    def close(self) -> None:
        """Stop the server and channels, then the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def stop():
            if self._unacknowledged:
                _, late = await asyncio.wait(set(self._unacknowledged), timeout=DRAIN_TIMEOUT)
                if late:
                    log.warning("transport on port %d: %d send(s) unacknowledged after %.0fs",
                                self.port, len(late), DRAIN_TIMEOUT)
            await self._server.stop(grace=1.0)
            for client in [held[0] for held in self._clients.values()] + self._retired:
                await client.close()

        try:
            self.call(stop(), timeout=DRAIN_TIMEOUT + 10.0)
        except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
            log.warning("transport on port %d did not stop cleanly: %s", self.port, exc)
        self._loop_thread.stop(timeout=10.0)


def _warn_if_open(host: str, port: int, *, token: str | None,
                  tls: TlsConfig | MutualTls | None) -> None:
    """Say loudly what anyone on the network can do to a server that is not loopback-only."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        loopback = False
    if loopback:
        return
    if tls is None:
        log.warning("peer server on %s:%d speaks plain gRPC to the network: shards and the "
                    "token travel unencrypted%s", host, port,
                    "" if token else ", and with no token anyone who reaches it can push")
    elif token is None and not isinstance(tls, MutualTls):  # mTLS: certified peers only
        log.warning("peer server on %s:%d has no token: anyone who reaches it can push", host,
                    port)
