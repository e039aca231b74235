"""The peer server's bounds (peer_server.py's note on bounds), each over real gRPC on loopback:
message size (and that legitimate pushes still fit), the peer server's resident memory under a
flood of unauthenticated 60 MiB pushes (measured in its own process, with the pre-bounds
settings as the control), concurrent calls, per-sender caps, the server's own wait cap, waits
and receive state freed on cancellation and on a generation change, and the bounded drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from peer_harness import TOKEN, MiB, Node, deadline, header, refused, server_growth

from communication import peer_client, peer_server, refusal
from communication.codec import as_bytes
from communication.framing import chunk_message, data_frame, header_frame
from communication.peer_client import PeerCallError
from communication.peer_server import ServerLimits
from communication.proto import zerop2p_pb2 as pb


@pytest.fixture
async def node():
    n = await Node().start()
    yield n
    await n.stop()


# -- message size --------------------------------------------------------------------------

async def test_one_chunk_fits_one_message_and_larger_contributions_still_land(node):
    assert peer_client.CHUNK_BYTES <= peer_server.MAX_CHUNK_BYTES
    big = pb.TensorHeader(key="g123456/s99999999/u999/m99/reduce_scatter" * 4, generation=2**62,
                          sender=2**30, origin=2**30, dtype="bfloat16", shape=[2**62] * 8,
                          offset=2**62, total_bytes=2**62, codec="int8")
    assert len(chunk_message(big, memoryview(bytes(MiB)))) <= peer_server.MAX_MESSAGE_BYTES
    client = node.client()
    for n in (MiB // 4, 3 * MiB // 4 + 5):  # one PushOne of a full chunk; a Push stream of 4
        key = f"fits{n}"
        slot = node.open(key, n)
        slot.put(0, torch.zeros(n))
        x = torch.arange(n, dtype=torch.float32)
        await client.push(header(key, n=n, nbytes=4 * n), as_bytes(x), deadline=deadline())
        await slot.wait(5.0)
        assert torch.equal(slot.result(), x)
    await client.close()


async def test_a_60_mib_message_is_refused_by_grpc_before_any_handler(node):
    err = await refused(node.push_one(bytes(60 * MiB), timeout=10.0))  # no token either
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "larger than max" in err.details()
    assert node.acc.started == 0


@pytest.mark.parametrize("mode", ["bounded", "legacy"])
async def test_a_flood_of_unauthenticated_60_mib_pushes_leaves_the_server_memory_flat(mode):
    before, after, codes = await server_growth(mode)
    rise, peak = after["VmRSS"] - before["VmRSS"], after["VmHWM"] - before["VmRSS"]
    print(f"{mode}: resident {before['VmRSS']:.0f} -> {after['VmRSS']:.0f} MiB (+{rise:.0f}), "
          f"peak +{peak:.0f} MiB; codes {set(codes)}")
    if mode == "bounded":
        assert codes == ["RESOURCE_EXHAUSTED"] * 8
        assert rise < 50 and peak < 50, (before, after)
    else:  # the control: the same measurement catches the unbounded server
        assert codes == ["UNAUTHENTICATED"] * 8
        assert peak > 200, (before, after)


# -- calls, caps and waits -----------------------------------------------------------------

def one(h: pb.TensorHeader, payload: bytes = bytes(16)) -> bytes:
    return chunk_message(h, memoryview(payload))


async def test_concurrent_calls_are_capped_by_grpc():
    node = await Node().start(max_concurrent_rpcs=2)
    try:
        waiting = [asyncio.ensure_future(node.push_one(one(header(f"u{i}")), timeout=10.0,
                                                       metadata=TOKEN)) for i in range(2)]
        await node.acc.reach(started=2)
        err = await refused(node.ping(pb.PingRequest().SerializeToString(), timeout=5.0,
                                      metadata=TOKEN))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        for i, call in enumerate(waiting):
            node.open(f"u{i}").put(0, torch.zeros(4))
            assert pb.PushReply.FromString(await call).received_bytes == 16
    finally:
        await node.stop()


async def test_open_contributions_per_sender_are_capped_naming_cap_sender_and_key():
    node = await Node().start(limits=ServerLimits(open_per_sender=2))
    try:
        calls = [node.push_one(one(header(f"w{i}")), timeout=10.0, metadata=TOKEN)
                 for i in range(2)]
        waiting = [asyncio.ensure_future(c) for c in calls]
        await node.acc.reach(started=2)
        err = await refused(node.push_one(one(header("w2")), timeout=5.0, metadata=TOKEN))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for words in ("cap of 2 open contributions", "sender 1", "key w2"):
            assert words in err.details(), err.details()
        other = asyncio.ensure_future(  # another sender is not held back by sender 1's calls
            node.push_one(one(header("w0", sender=0)), timeout=10.0, metadata=TOKEN))
        await node.acc.reach(started=3)
        for call in waiting:
            call.cancel()
        await node.acc.reach(ended=2)
        assert node.servicer.ledger.calls == {0: 1}
        slot = node.open("w0")
        assert pb.PushReply.FromString(await other).received_bytes == 16
        assert slot.missing() == [1]
    finally:
        await node.stop()


async def test_in_flight_bytes_per_sender_are_capped():
    node = await Node().start(limits=ServerLimits(bytes_per_sender=24))
    try:
        waiting = asyncio.ensure_future(node.push_one(one(header("b0")), timeout=10.0,
                                                      metadata=TOKEN))
        await node.acc.reach(started=1)
        err = await refused(node.push_one(one(header("b1")), timeout=5.0, metadata=TOKEN))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for words in ("cap of 24 in-flight bytes", "sender 1", "key b1", "16 in flight"):
            assert words in err.details(), err.details()
        huge = header("b2", nbytes=1 << 40)  # announced, never sent: refused before any wait
        err = await refused(node.push(iter([header_frame(huge)]), timeout=5.0, metadata=TOKEN))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "b2" in err.details()
        node.open("b0").put(0, torch.zeros(4))
        assert not pb.PushReply.FromString(await waiting).duplicate
        assert node.servicer.ledger.bytes == {}
    finally:
        await node.stop()


async def test_the_server_waits_its_own_cap_not_the_callers_hour():
    node = await Node().start(limits=ServerLimits(max_wait=0.5))
    client = node.client()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        with pytest.raises(PeerCallError) as info:
            await asyncio.wait_for(client.push(header("never"), as_bytes(torch.ones(4)),
                                               deadline=deadline(3600.0)), 10.0)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "server cap" in str(info.value) and "never" in str(info.value)
        assert loop.time() - start < 3.0
        assert node.acc.waiting() == 0
    finally:
        await client.close()
        await node.stop()


async def test_cancelled_waits_for_unopened_keys_are_forgotten(node):
    client = node.client()
    two_mib = torch.zeros(2 * MiB, dtype=torch.uint8)
    pushes = [asyncio.ensure_future(client.push(header(f"c{i}", n=MiB // 2, nbytes=2 * MiB),
                                                two_mib, deadline=deadline(30.0)))
              for i in range(20)]
    await node.acc.reach(started=20)
    assert node.acc.waiting() == 20 and sum(node.servicer.ledger.bytes.values()) == 40 * MiB
    for push in pushes:
        push.cancel()  # the peer gives up: gRPC cancels the server's handlers
    await node.acc.reach(ended=20)
    assert node.acc.waiting() == 0
    assert node.servicer.ledger.calls == {} and node.servicer.ledger.bytes == {}
    await client.close()


async def test_a_generation_change_ends_the_waits_of_older_generations_at_once(node):
    client = node.client()
    push = asyncio.ensure_future(client.push(header("g3/old"), as_bytes(torch.ones(4)),
                                             deadline=deadline(30.0)))
    await node.acc.reach(started=1)
    node.gen = 4
    node.acc.drop_generations_below(4)
    with pytest.raises(PeerCallError) as info:
        await asyncio.wait_for(push, 5.0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "generation expected 4, actual 3" in str(info.value) and "g3/old" in str(info.value)
    assert node.acc.waiting() == 0
    await client.close()


async def test_a_cancelled_partial_receive_frees_its_state_and_a_retry_lands(node):
    slot = node.open("p", 2 * MiB // 4)
    slot.put(0, torch.zeros(2 * MiB // 4))

    async def stalled():
        yield header_frame(header("p", n=2 * MiB // 4, nbytes=2 * MiB))
        yield data_frame(memoryview(bytes(MiB)))
        await asyncio.Event().wait()  # then the sender stalls until it is cancelled

    call = node.push(stalled(), timeout=30.0, metadata=TOKEN)
    await asyncio.wait_for(node.servicer.claimed.wait(), 10.0)
    assert node.servicer.receiving() == 1
    pooled = slot._staged[1]
    call.cancel()
    await asyncio.wait_for(node.servicer.dropped.wait(), 10.0)  # learnt asynchronously
    assert node.servicer.receiving() == 0 and 1 not in slot._staged
    assert any(t is pooled for ts in node.acc.pool._free.values() for t in ts)
    client = node.client()
    x = torch.arange(2 * MiB // 4, dtype=torch.float32)
    await client.push(header("p", n=x.numel(), nbytes=2 * MiB), as_bytes(x), deadline=deadline())
    await slot.wait(5.0)
    assert torch.equal(slot.result(), x)
    await client.close()


# -- drain -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["chunks", "headers"])
async def test_a_refused_stream_is_drained_only_up_to_its_bound(node, kind):
    node.open()
    pulled = 0
    frame = (data_frame(memoryview(bytes(MiB))) if kind == "chunks"
             else header_frame(header()))  # headers carry no data bytes: frames are counted

    async def endless():
        nonlocal pulled
        yield header_frame(header(n=5, nbytes=20))  # refused: shape [5] for a [4] slot
        while True:
            pulled += 1
            yield frame

    loop = asyncio.get_running_loop()
    start = loop.time()
    err = await refused(node.push(endless(), timeout=30.0, metadata=TOKEN))
    assert err.code() != grpc.StatusCode.OK and loop.time() - start < 5.0
    bound = (refusal.MAX_DRAIN_BYTES // MiB if kind == "chunks"
             else refusal.MAX_DRAIN_FRAMES)
    print(f"refused stream of {kind}: gRPC pulled {pulled}, the server drains {bound}")
    # The rest sat in flow-control windows. Before: 1 GiB of chunks, headers until the deadline.
    assert pulled <= bound + 32 if kind == "chunks" else pulled < 10 * bound


async def test_a_trickling_refused_stream_is_answered_after_the_drain_wait(node, monkeypatch):
    monkeypatch.setattr(refusal, "DRAIN_WAIT", 0.5)
    node.open()

    async def trickle():
        yield header_frame(header(n=5, nbytes=20))
        while True:
            await asyncio.sleep(0.1)  # a slow sender, one byte at a time
            yield data_frame(memoryview(b"x"))

    loop = asyncio.get_running_loop()
    start = loop.time()
    err = await refused(node.push(trickle(), timeout=30.0, metadata=TOKEN))
    assert err.code() != grpc.StatusCode.OK and loop.time() - start < 3.0
