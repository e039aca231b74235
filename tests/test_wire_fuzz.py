"""The wire, over real gRPC on loopback: exact byte coverage (overlapping or repeated ranges
refused), one codec per contribution, INVALID_ARGUMENT for undecodable bytes; then property
tests of framing.py's parsers and of the peer server's receive path.

Whatever bytes arrive (random, truncated, or a valid message with random header fields,
ranges, dtypes and codecs), the answer is a result or a refusal: the parsers return their types
or raise FrameError; the server answers OK (and then the slot holds exactly the sent values)
or INVALID_ARGUMENT / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, within its deadline, and a
refusal leaves the slot, the receive state and the per-sender ledger as they were."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peer_harness import TOKEN, MiB, Node, deadline, header, refused

from communication.accumulator import Accumulator
from communication.codec import get_codec
from communication.framing import (
    FrameError,
    chunk_message,
    data_frame,
    header_frame,
    parse_chunk,
    parse_frame,
)
from communication.loop_thread import LoopThread
from communication.peer_client import PeerCallError, PeerClient
from communication.peer_server import PeerServicer, ServerLimits, create_server
from communication.proto import zerop2p_pb2 as pb
from communication.slot import Expectation, Mode

FAST = settings(max_examples=200, deadline=None)
RPC = settings(max_examples=120, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED}
KEY, N = "g3/s0/u0/m0/reduce_scatter", 6
CODECS = ["raw", "bf16", "int8"]
X = torch.linspace(-3.0, 5.0, N)  # the contribution of rank 1, 6 values

int64 = st.integers(-(2**63), 2**63 - 1)
headers = st.builds(
    pb.TensorHeader, key=st.text(max_size=40), generation=int64,
    sender=st.integers(-(2**31), 2**31 - 1), origin=st.integers(-(2**31), 2**31 - 1),
    dtype=st.sampled_from(["float32", "bfloat16", "int64", "nope", ""]),
    shape=st.lists(int64, max_size=5), offset=int64, total_bytes=int64,
    codec=st.sampled_from([*CODECS, "zip", ""]))


@pytest.fixture
async def node():
    n = await Node().start()
    yield n
    await n.stop()


# -- coverage, codec, decoding -----------------------------------------------------------

async def range_push(client, key, x, a, b, *, codec="raw", n=4):
    wire = get_codec(codec).encode(x)
    return await client.push(header(key, n=n, offset=a, nbytes=b - a, codec=codec), wire[a:b],
                             deadline=deadline())


@pytest.mark.parametrize("chunk_bytes", [3, MiB], ids=["Push", "PushOne"])
async def test_overlapping_or_repeated_ranges_are_refused_and_coverage_is_exact(node,
                                                                              chunk_bytes):
    slot = node.open("r")
    slot.put(0, torch.zeros(4))
    client = PeerClient(f"127.0.0.1:{node.port}", token="secret", chunk_bytes=chunk_bytes)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    await range_push(client, "r", x, 0, 8)
    for a, b, seen in [(4, 12, "[0, 8)"), (0, 8, "[0, 8)"), (0, 4, "[0, 8)")]:
        with pytest.raises(PeerCallError) as info:  # 8 + 8 bytes would "complete" 16 before
            await range_push(client, "r", x, a, b)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        for words in ("key r", "origin 1", f"[{a}, {b})", f"overlaps {seen}"):
            assert words in str(info.value), str(info.value)
        assert slot.missing() == [1]
    await range_push(client, "r", x, 8, 16)
    await slot.wait(5.0)
    assert slot.result().tolist() == x.tolist()
    await client.close()


async def test_a_contribution_keeps_the_codec_of_its_first_range(node):
    slot = node.open("c")
    slot.put(0, torch.zeros(4))
    client = node.client()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    await range_push(client, "c", x, 0, 4, codec="bf16")  # bf16: 8 bytes in all
    with pytest.raises(PeerCallError) as info:  # raw bytes would be committed undecoded
        await range_push(client, "c", x, 4, 8, codec="raw")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    for words in ("key c", "origin 1", "codec expected bf16", "actual raw"):
        assert words in str(info.value), str(info.value)
    assert slot.missing() == [1]
    await range_push(client, "c", x, 4, 8, codec="bf16")
    await slot.wait(5.0)
    assert slot.result().tolist() == x.tolist()
    await client.close()


@pytest.mark.parametrize("method, message", [
    ("PushOne", b"\x0a\x05\x0a\x09abc"),  # a header whose key runs past the message
    ("PushOne", b"\x12\xff"),  # a length prefix with no end
    ("Push", b"\x0a\x03\x0a\x01\xff"),  # a header whose key is not UTF-8
    ("Ping", b"\x08"),  # a field with no value
])
async def test_undecodable_messages_are_invalid_argument(node, method, message):
    stub = {"Push": node.push, "PushOne": node.push_one, "Ping": node.ping}[method]
    request = iter([message]) if method == "Push" else message
    err = await refused(stub(request, timeout=5.0, metadata=TOKEN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "undecodable" in err.details() and method in err.details()


async def test_a_bad_data_frame_in_a_stream_is_invalid_argument_and_frees_the_range(node):
    slot = node.open("d")
    frames = [header_frame(header("d")), data_frame(memoryview(bytes(8))), b"\x12\xff"]
    err = await refused(node.push(iter(frames), timeout=5.0, metadata=TOKEN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "key d" in err.details()
    assert node.servicer.receiving() == 0 and slot.missing() == [0, 1]


# -- framing -------------------------------------------------------------------------------

@FAST
@given(h=headers, payload=st.binary(max_size=300))
def test_frames_and_chunks_round_trip_and_match_protobuf(h, payload):
    assert parse_frame(header_frame(h)) == h
    assert bytes(parse_frame(data_frame(memoryview(payload)))) == payload
    got_h, got = parse_chunk(chunk_message(h, memoryview(payload)))
    assert got_h == h and bytes(got) == payload
    as_pb = pb.TensorChunk(header=h, data=payload).SerializeToString()
    assert parse_chunk(as_pb)[0] == h and bytes(parse_chunk(as_pb)[1]) == payload


def parsed_or_refused(parse, raw: bytes):
    """parse(raw), or None if it raised FrameError (any other exception fails the test)."""
    try:
        return parse(raw)
    except FrameError:
        return None


@FAST
@given(h=headers, payload=st.binary(max_size=64), cut=st.integers(0, 400),
       noise=st.binary(max_size=8))
def test_truncated_or_noisy_bytes_parse_to_their_types_or_raise_frame_error(h, payload, cut,
                                                                             noise):
    for whole in (header_frame(h), data_frame(memoryview(payload)),
                  chunk_message(h, memoryview(payload))):
        for raw in (whole[:cut], whole[:cut] + noise, noise + whole[cut:]):
            frame = parsed_or_refused(parse_frame, raw)
            assert frame is None or isinstance(frame, (pb.TensorHeader, memoryview))
            chunk = parsed_or_refused(parse_chunk, raw)
            assert chunk is None or (chunk[0] is None or isinstance(chunk[0], pb.TensorHeader)
                                     ) and isinstance(chunk[1], memoryview)


# -- the receive path ----------------------------------------------------------------------

class Server:
    """A peer server (rank 0 of 2, generation 3) on its own loop thread, with a sync stub."""

    def __init__(self):
        self.thread = LoopThread("fuzz-peer")
        self.acc, self.servicer, self.server, port = self.thread.call(self._start(), timeout=30)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.push_one = self.channel.unary_unary("/zerop2p.Peer/PushOne")
        self.push = self.channel.stream_unary("/zerop2p.Peer/Push")

    async def _start(self):
        acc = Accumulator(asyncio.get_running_loop())
        servicer = PeerServicer(acc, rank=lambda: 0, generation=lambda: 3,
                                limits=ServerLimits(max_wait=0.05, bytes_per_sender=1 << 20))
        server, port = await create_server(servicer, token="secret")
        return acc, servicer, server, port

    def on_loop(self, fn):
        async def run():
            return fn()
        return self.thread.call(run(), timeout=10)

    def open(self):
        def fresh():
            self.acc.close(KEY, finished=False)
            self.servicer.forget(KEY)
            slot = self.acc.open(Expectation(key=KEY, generation=3, world_size=2, shape=(N,),
                                             dtype=torch.float32, mode=Mode.SUM))
            slot.put(0, torch.zeros(N))
            return slot
        return self.on_loop(fresh)

    def send(self, message: bytes, stream: bool) -> tuple[grpc.StatusCode, pb.PushReply | None]:
        """One PushOne of message, or a Push of it cut into a header frame and data frames;
        the status and, if OK, the reply."""
        try:
            if stream:
                raw = self.push(iter(frames_of(message)), timeout=5.0, metadata=TOKEN)
            else:
                raw = self.push_one(message, timeout=5.0, metadata=TOKEN)
        except grpc.RpcError as exc:
            return exc.code(), None
        return grpc.StatusCode.OK, pb.PushReply.FromString(raw)

    def close(self):
        self.channel.close()
        self.thread.call(self.server.stop(0), timeout=30)
        self.thread.stop(timeout=10)


def frames_of(message: bytes) -> list[bytes]:
    """A chunk message as Push frames (the header frame, then its data in two frames)."""
    try:
        h, data = parse_chunk(message)
    except FrameError:
        return [message]
    head = [header_frame(h)] if h is not None else []
    half = len(data) // 2
    return head + [data_frame(data[:half]), data_frame(data[half:])]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def wire(codec: str) -> bytes:
    return bytes(get_codec(codec).encode(X).numpy())


def valid(codec: str, a: int, b: int) -> pb.TensorHeader:
    return pb.TensorHeader(key=KEY, generation=3, sender=1, origin=1, dtype="float32",
                           shape=[N], offset=a, total_bytes=b - a, codec=codec)


@st.composite
def contributions(draw):
    """Pushes of rank 1's contribution: a partition of its bytes into 1-3 ranges (shuffled),
    each sent as it is or (1 in 3) with one or two header fields replaced at random, its
    payload the true bytes or (1 in 4) noise, its message (1 in 4) cut short; then one random
    range. A list of (header, message)."""
    codec = draw(st.sampled_from(CODECS))
    total = len(wire(codec))
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=2)))
    pieces = draw(st.permutations(list(zip([0, *cuts], [*cuts, total]))))
    out = []
    for a, b in pieces + draw(st.lists(st.tuples(st.integers(0, total), st.integers(0, total)),
                                       max_size=1)):
        a, b = min(a, b), max(a, b)
        h = valid(codec, a, b)
        mutated = draw(st.integers(0, 2)) == 0
        for name in draw(st.sets(st.sampled_from(["key", "generation", "sender", "dtype",
                                                   "shape", "offset", "total_bytes", "codec"]),
                                 min_size=1, max_size=2)) if mutated else ():
            field = draw(headers)
            if name == "shape":
                h.shape[:] = field.shape
            else:
                setattr(h, name, getattr(field, name))
        true = draw(st.integers(0, 3)) > 0
        payload = wire(codec)[a:b] if true else draw(st.binary(max_size=total + 8))
        message = chunk_message(h, memoryview(payload))
        cut = draw(st.integers(0, len(message))) if draw(st.integers(0, 3)) == 0 else None
        out.append((h, message if cut is None else message[:cut]))
    return out


@RPC
@given(sequence=contributions(), stream=st.booleans())
def test_the_receive_path_answers_a_result_or_a_refusal_and_a_refusal_changes_nothing(
        server, sequence, stream):
    slot = server.open()
    accepted: list[tuple[int, int]] = []  # byte ranges the server took, in order
    sent, codec = None, None  # the contribution's bytes as the server should hold them
    for _, message in sequence:
        missing_before = server.on_loop(slot.missing)
        code, reply = server.send(message, stream)
        event(f"answer {code.name}")
        assert code == grpc.StatusCode.OK or code in REFUSALS, code
        missing, ledger = server.on_loop(lambda: (slot.missing(),
                                                  dict(server.servicer.ledger.bytes)))
        assert ledger == {}  # every call's hold ended with it
        if code != grpc.StatusCode.OK or reply.duplicate:
            assert missing == missing_before
            continue
        got_h, data = parse_chunk(message)
        a, b = got_h.offset, got_h.offset + len(data)
        assert all(b <= c or d <= a for c, d in accepted), (a, b, accepted)  # no overlap
        if sent is None:
            codec = got_h.codec
            sent = bytearray(get_codec(codec).wire_bytes(N, torch.float32))
        assert got_h.codec == codec  # one codec per contribution
        accepted.append((a, b))
        sent[a:b] = data
        covered = sum(d - c for c, d in accepted)
        assert (missing == []) == (covered == len(sent)), (missing, accepted, len(sent))
        if not missing:  # complete: exactly the bytes sent, decoded by the one codec
            event(f"complete ({codec}, {len(accepted)} ranges)")
            expected = get_codec(codec).decode(torch.frombuffer(sent, dtype=torch.uint8), N,
                                               torch.float32)
            torch.testing.assert_close(server.on_loop(slot.result), expected, rtol=0, atol=0,
                                       equal_nan=True)
            break
    assert server.on_loop(server.servicer.receiving) <= 1
