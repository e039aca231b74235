"""A collective completes on receipt, not on the peers' acknowledgements (one one-way delay per
collective instead of a round trip), and a refusal that comes back after completion fails the
next collective at once, naming the peer's rank, its address and the key it refused.

Rank 0 is a real GrpcTransport; rank 1 is a real gRPC server that answers every push late
(``REPLY_AFTER``) with a refusal or an acknowledgement, while the test delivers rank 1's own
contributions to rank 0 through a real PeerClient."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from communication.accumulator import Accumulator
from communication.codec import as_bytes
from communication.collectives import CollectiveError, Key, Phase
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from communication.peer_client import PeerClient
from communication.peer_server import PeerServicer, create_server
from communication.proto import zerop2p_pb2 as pb

TOKEN = "acks"
REPLY_AFTER = 1.5
GENERATION = 4


class LatePeer(PeerServicer):
    """Answers each PushOne after REPLY_AFTER seconds: the first refused (with ``refuse``),
    every other acknowledged, so a later collective can fail only through the first's late
    refusal, never through its own (which would race it)."""

    def __init__(self, *args, refuse: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.refuse = refuse
        self.received: list[str] = []
        self.arrivals = threading.Semaphore(0)  # one release per push that reached this peer

    async def PushOne(self, request, context):  # noqa: N802 - gRPC method name
        header, _ = request
        self.received.append(header.key)
        first = len(self.received) == 1
        self.arrivals.release()
        await asyncio.sleep(REPLY_AFTER)  # the acknowledgement is slow on purpose
        if self.refuse and first:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused by the test peer")
        return pb.PushReply()


@pytest.fixture
def pair(request):
    """(rank 0's collectives, rank 1's servicer, rank 1's address, a deliver(key, value))."""
    transport = GrpcTransport(token=TOKEN)

    async def start():
        servicer = LatePeer(Accumulator(asyncio.get_running_loop()), rank=lambda: 1,
                            generation=lambda: GENERATION, refuse=request.param)
        server, port = await create_server(servicer, token=TOKEN)
        return servicer, server, f"127.0.0.1:{port}", PeerClient(transport.address, token=TOKEN)

    servicer, server, address, client = transport.call(start(), timeout=10)
    coll = GrpcCollectives.bind(transport, rank=0, world_size=2,
                                peers=[transport.address, address], generation=GENERATION,
                                timeout=20.0)

    def deliver(key: Key, value: torch.Tensor) -> None:
        """Rank 1's contribution to ``key``, pushed to rank 0."""
        h = pb.TensorHeader(key=str(key), generation=GENERATION, sender=1, origin=1,
                            dtype="float32", shape=list(value.shape), offset=0,
                            total_bytes=value.numel() * 4, codec="raw")
        loop_time = transport.loop.time()
        transport.call(client.push(h, as_bytes(value), deadline=loop_time + 10), timeout=10)

    yield coll, servicer, address, deliver
    transport.call(server.stop(0), timeout=10)
    transport.close()


def key(step: int) -> Key:
    return Key(generation=GENERATION, phase=Phase.ALL_REDUCE, step=step, unit=0, micro_batch=0)


@pytest.mark.parametrize("pair", [True], indirect=True, ids=["refusing-peer"])
def test_a_late_refusal_fails_the_next_collective_naming_peer_and_key(pair):
    coll, servicer, address, deliver = pair
    first = key(0)
    start = time.monotonic()
    fut = coll.all_reduce(first, torch.ones(3))
    deliver(first, torch.full((3,), 2.0))
    total = fut.result(timeout=10)
    took = time.monotonic() - start
    assert torch.equal(total, torch.full((3,), 3.0))
    assert took < REPLY_AFTER, f"completion waited for the acknowledgement ({took:.2f}s)"
    # Completion is on hand-over to gRPC, so the peer may take the push a moment later.
    assert servicer.arrivals.acquire(timeout=REPLY_AFTER), "our push never reached the peer"
    assert servicer.received == [str(first)]

    start = time.monotonic()
    with pytest.raises(CollectiveError) as err:
        coll.all_reduce(key(1), torch.ones(3)).result(timeout=30)
    took = time.monotonic() - start
    message = str(err.value)
    assert err.value.rank == 1 and err.value.address == address
    assert str(first) in message and address in message and "refused by the test peer" in message
    assert str(key(1)) in message  # the collective that failed names itself too
    assert took < REPLY_AFTER + 3, f"the refusal surfaced only after {took:.1f}s (deadline 20s)"


@pytest.mark.parametrize("pair", [False], indirect=True, ids=["slow-peer"])
def test_a_slow_acknowledgement_costs_no_wait_and_no_error(pair):
    """The control: the same slow peer acknowledging, so nothing may fail."""
    coll, servicer, _, deliver = pair
    for step in range(3):
        fut = coll.all_reduce(key(step), torch.ones(2))
        deliver(key(step), torch.ones(2))
        assert torch.equal(fut.result(timeout=REPLY_AFTER), torch.full((2,), 2.0))
    # Completion is on hand-over to gRPC: the last pushes may reach the peer a moment later.
    assert all(servicer.arrivals.acquire(timeout=REPLY_AFTER) for _ in range(3))
    assert servicer.received == [str(key(s)) for s in range(3)]
