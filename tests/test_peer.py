"""Peer server and client over real gRPC on loopback: auth, validation at the door,
generations, idempotent retries, deadlines, TLS."""

from __future__ import annotations

import asyncio
import collections
import shutil
import subprocess

import grpc
import pytest
import torch

from communication.accumulator import Accumulator
from communication.auth import TlsConfig
from communication.codec import as_bytes
from communication.peer_client import PeerCallError, PeerClient
from communication.peer_server import PeerServicer, create_server
from communication.proto import zerop2p_pb2 as pb
from communication.slot import Expectation, Mode

KEY = "g3/s0/u0/m0/reduce_scatter"


class CountingServicer(PeerServicer):
    """The real servicer, counting which RPC carried each push."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = collections.Counter()

    async def Push(self, request_iterator, context):  # noqa: N802 - gRPC method name
        self.calls["Push"] += 1
        return await super().Push(request_iterator, context)

    async def PushOne(self, request, context):  # noqa: N802 - gRPC method name
        self.calls["PushOne"] += 1
        return await super().PushOne(request, context)


class Node:
    """A real server on port 0 with its accumulator, at generation 3 as rank 0 of 2."""

    async def start(self, *, token="secret", tls=None):
        self.acc = Accumulator(asyncio.get_running_loop())
        self.gen = 3
        self.servicer = CountingServicer(self.acc, rank=lambda: 0, generation=lambda: self.gen)
        self.server, self.port = await create_server(self.servicer, token=token, tls=tls)
        return self

    def open(self, key=KEY, n=4):
        return self.acc.open(Expectation(key=key, generation=3, world_size=2, shape=(n,),
                                         dtype=torch.float32, mode=Mode.SUM))


def header(*, key=KEY, gen=3, sender=1, shape=(4,), dtype="float32", nbytes=16, offset=0):
    return pb.TensorHeader(key=key, generation=gen, sender=sender, origin=sender, dtype=dtype,
                           shape=list(shape), offset=offset, total_bytes=nbytes, codec="raw")


@pytest.fixture
async def node():
    n = await Node().start()
    yield n
    await n.server.stop(0)


def deadline(seconds=5.0):
    return asyncio.get_running_loop().time() + seconds


# 16 bytes with 5-byte chunks stream over Push; with the default 1 MiB chunk they fit one PushOne.
PATHS = pytest.mark.parametrize("chunk_bytes", [5, 1 << 20], ids=["Push", "PushOne"])


@PATHS
async def test_push_lands_in_the_slot_and_a_retry_is_a_duplicate(node, chunk_bytes):
    slot = node.open()
    slot.put(0, torch.ones(4))
    client = PeerClient(f"127.0.0.1:{node.port}", token="secret", chunk_bytes=chunk_bytes)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    reply = await client.push(header(), as_bytes(x), deadline=deadline())
    assert reply.received_bytes == 16 and not reply.duplicate
    again = await client.push(header(), as_bytes(x * 100), deadline=deadline())
    assert again.duplicate
    await slot.wait(1.0)
    assert slot.result().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert node.servicer.calls == {"Push" if chunk_bytes < 16 else "PushOne": 2}
    await client.close()


async def test_push_one_without_a_header_is_invalid_argument(node):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{node.port}")
    call = channel.unary_unary("/zerop2p.Peer/PushOne", request_serializer=None,
                               response_deserializer=pb.PushReply.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(pb.TensorChunk(data=b"1234").SerializeToString(), timeout=5.0,
                   metadata=(("authorization", "Bearer secret"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "without a header" in info.value.details()
    await channel.close()


async def test_two_byte_ranges_make_one_contribution(node):
    slot = node.open()
    slot.put(0, torch.zeros(4))
    client = PeerClient(f"127.0.0.1:{node.port}", token="secret")
    wire = as_bytes(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    await client.push(header(nbytes=8), wire[:8], deadline=deadline())
    assert slot.missing() == [1]
    await client.push(header(nbytes=8, offset=8), wire[8:], deadline=deadline())
    await slot.wait(1.0)
    assert slot.result().tolist() == [1.0, 2.0, 3.0, 4.0]
    await client.close()


@PATHS
@pytest.mark.parametrize("token", [None, "wrong"])
async def test_wrong_or_missing_token_is_unauthenticated(node, token, chunk_bytes):
    node.open()
    client = PeerClient(f"127.0.0.1:{node.port}", token=token, chunk_bytes=chunk_bytes)
    with pytest.raises(PeerCallError) as info:
        await client.push(header(), as_bytes(torch.ones(4)), deadline=deadline())
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(PeerCallError):
        await client.ping(3, 1, timeout=2.0)
    await client.close()


@pytest.mark.parametrize("bad, words", [
    (dict(shape=(5,), nbytes=20), ["shape", "[4]", "[5]"]),
    (dict(dtype="float16", nbytes=8), ["dtype", "float32", "float16"]),
    (dict(gen=2), ["generation", "expected 3", "actual 2"]),
    (dict(nbytes=12), ["more than the announced 12 bytes"]),
    (dict(offset=8), ["byte range"]),
])
@PATHS
async def test_mismatch_is_invalid_argument_naming_it_and_changes_nothing(node, bad, words,
                                                                          chunk_bytes):
    slot = node.open()
    client = PeerClient(f"127.0.0.1:{node.port}", token="secret", chunk_bytes=chunk_bytes)
    with pytest.raises(PeerCallError) as info:
        await client.push(header(**bad), as_bytes(torch.ones(4)), deadline=deadline())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for w in ["sender 1", *words]:
        assert w in str(info.value), (w, str(info.value))
    assert slot.missing() == [0, 1]
    await client.close()


async def test_unopened_key_times_out_at_the_callers_deadline(node):
    client = PeerClient(f"127.0.0.1:{node.port}", token="secret")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(PeerCallError) as info:
        await client.push(header(key="never"), as_bytes(torch.ones(4)), deadline=deadline(0.5))
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - start < 2.0
    await client.close()


async def test_dead_address_fails_within_deadline_naming_it():
    client = PeerClient("127.0.0.1:1", token="secret")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(PeerCallError, match="127.0.0.1:1"):
        await client.ping(1, 0, timeout=1.0)
    assert loop.time() - start < 2.0
    await client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
async def test_tls_round_trip(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    tls = TlsConfig(cert_file=str(tmp_path / "cert.pem"), key_file=str(tmp_path / "key.pem"),
                    ca_file=str(tmp_path / "cert.pem"), server_name="localhost")
    node = await Node().start(tls=tls)
    try:
        client = PeerClient(f"127.0.0.1:{node.port}", token="secret", tls=tls)
        reply = await client.ping(3, 1, timeout=5.0)
        assert reply.generation == 3
        await client.close()
        plain = PeerClient(f"127.0.0.1:{node.port}", token="secret")
        with pytest.raises(PeerCallError):
            await plain.ping(3, 1, timeout=1.0)
        await plain.close()
    finally:
        await node.server.stop(0)
