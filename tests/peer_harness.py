"""A peer server over real gRPC on loopback for tests that watch its bounds (test_peer_bounds.py,
test_wire_fuzz.py): a Node whose accumulator and servicer announce, by events, when pushes
start and stop waiting for keys and when receive state is claimed and dropped; and a peer
server in its own process whose resident memory is read from /proc."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from communication import peer_server
from communication.accumulator import Accumulator
from communication.peer_client import PeerClient
from communication.peer_server import PeerServicer, create_server
from communication.proto import zerop2p_pb2 as pb
from communication.slot import Expectation, Mode

ROOT = Path(__file__).resolve().parents[1]
TOKEN = (("authorization", "Bearer secret"),)
MiB = 1 << 20


class WatchedAccumulator(Accumulator):
    """The real accumulator, counting pushes that start and stop waiting for their key."""

    def __init__(self, loop):
        super().__init__(loop)
        self.started = self.ended = 0
        self._watchers: list[tuple[int, int, asyncio.Future]] = []

    async def slot(self, key, timeout, *, generation=None):
        waits = key not in self._slots and not self.finished(key)
        self.started += waits
        self._changed()
        try:
            return await super().slot(key, timeout, generation=generation)
        finally:
            self.ended += waits
            self._changed()

    def _changed(self) -> None:
        for started, ended, fut in self._watchers:
            if not fut.done() and self.started >= started and self.ended >= ended:
                fut.set_result(None)

    async def reach(self, *, started: int = 0, ended: int = 0, timeout: float = 10.0) -> None:
        """Return once that many waits started and ended (TimeoutError naming the counts)."""
        fut = asyncio.get_running_loop().create_future()
        self._watchers.append((started, ended, fut))
        self._changed()
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"waits started {self.started}/{started}, ended "
                               f"{self.ended}/{ended} after {timeout}s") from None


class WatchedServicer(PeerServicer):
    """The real servicer, announcing when it claims a byte range and drops a receive state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.claimed, self.dropped = asyncio.Event(), asyncio.Event()

    def _validate(self, *args):
        incoming = super()._validate(*args)
        self.claimed.set()
        return incoming

    def _drop(self, *args) -> None:
        super()._drop(*args)
        self.dropped.set()


class Node:
    """A real server on port 0 as rank 0 of 2 at generation 3."""

    async def start(self, *, limits=None, max_concurrent_rpcs=peer_server.MAX_CONCURRENT_RPCS):
        self.acc = WatchedAccumulator(asyncio.get_running_loop())
        self.gen = 3
        self.servicer = WatchedServicer(self.acc, rank=lambda: 0, generation=lambda: self.gen,
                                        limits=limits)
        self.server, self.port = await create_server(self.servicer, token="secret",
                                                     max_concurrent_rpcs=max_concurrent_rpcs)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}",
                                                 [("grpc.max_send_message_length", 128 * MiB)])
        self.push_one = self.channel.unary_unary("/zerop2p.Peer/PushOne")
        self.push = self.channel.stream_unary("/zerop2p.Peer/Push")
        self.ping = self.channel.unary_unary("/zerop2p.Peer/Ping")
        return self

    def open(self, key="k", n=4, dtype=torch.float32):
        return self.acc.open(Expectation(key=key, generation=3, world_size=2, shape=(n,),
                                         dtype=dtype, mode=Mode.SUM))

    def client(self) -> PeerClient:
        return PeerClient(f"127.0.0.1:{self.port}", token="secret")

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)


def header(key="k", *, sender=1, n=4, offset=0, nbytes=16, codec="raw", gen=3):
    return pb.TensorHeader(key=key, generation=gen, sender=sender, origin=sender,
                           dtype="float32", shape=[n], offset=offset, total_bytes=nbytes,
                           codec=codec)


def deadline(seconds=10.0):
    return asyncio.get_running_loop().time() + seconds


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, 10.0)
    return info.value


CHILD = """
import asyncio, sys
from communication import peer_server
from communication.accumulator import Accumulator
async def main(legacy):
    if legacy:  # the settings before the bounds: 64 MiB messages, unbounded calls
        peer_server.MAX_MESSAGE_BYTES = 64 << 20
    acc = Accumulator(asyncio.get_running_loop())
    servicer = peer_server.PeerServicer(acc, rank=lambda: 0, generation=lambda: 3)
    server, port = await peer_server.create_server(
        servicer, token="secret", max_concurrent_rpcs=None if legacy else 128)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)
asyncio.run(main(sys.argv[1] == "legacy"))
"""


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (resident peak) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


async def flood(port: int, *, calls: int, size: int) -> list[str]:
    """``calls`` concurrent PushOnes of ``size`` bytes without a token; their status codes."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                        [("grpc.max_send_message_length", 2 * size)])
    push_one = channel.unary_unary("/zerop2p.Peer/PushOne")
    payload = bytes(size)
    out = await asyncio.gather(*(push_one(payload, timeout=60.0) for _ in range(calls)),
                               return_exceptions=True)
    await channel.close()
    return [r.code().name if isinstance(r, grpc.aio.AioRpcError) else repr(r) for r in out]


async def server_growth(mode: str) -> tuple[dict, dict, list[str]]:
    """A peer server in its own process; its memory before and after 8 concurrent
    unauthenticated 60 MiB pushes (after one warm-up push of 1 KiB), and their codes."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60.0))
        await flood(port, calls=1, size=1024)
        before = memory_mib(child.pid)
        codes = await flood(port, calls=8, size=60 * MiB)
        return before, memory_mib(child.pid), codes
    finally:
        child.stdin.close()
        child.wait(timeout=30)
