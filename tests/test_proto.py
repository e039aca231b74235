"""The committed generated module matches zerop2p.proto and imports as a package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_not_stale():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_generated_modules_import_as_a_package_and_round_trip():
    from communication.proto import zerop2p_pb2 as pb

    # The service the peer server registers by hand (generic handlers; no generated stubs).
    assert set(pb.DESCRIPTOR.services_by_name["Peer"].methods_by_name) == {"Push", "PushOne",
                                                                          "Ping"}
    header = pb.TensorHeader(key="g1/s0/u0/m0/gather_fwd", generation=1, sender=2, origin=2,
                             dtype="bfloat16", shape=[3, 5], offset=0, total_bytes=30,
                             codec="raw")
    frame = pb.TensorFrame.FromString(pb.TensorFrame(header=header).SerializeToString())
    assert frame.WhichOneof("part") == "header" and frame.header == header
    data = pb.TensorFrame.FromString(pb.TensorFrame(data=b"\x00\xff" * 4).SerializeToString())
    assert data.WhichOneof("part") == "data" and data.data == b"\x00\xff" * 4


def test_hand_framed_data_is_a_valid_tensor_frame_both_ways():
    from communication.framing import data_frame, header_frame, parse_frame
    from communication.proto import zerop2p_pb2 as pb

    for n in (0, 1, 127, 128, 300_000):
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        raw = data_frame(memoryview(payload))
        assert pb.TensorFrame.FromString(raw).data == payload
        assert bytes(parse_frame(raw)) == payload
        assert bytes(parse_frame(pb.TensorFrame(data=payload).SerializeToString())) == payload
    header = pb.TensorHeader(key="k", sender=1, total_bytes=5)
    assert parse_frame(header_frame(header)) == header


def test_hand_framed_chunk_is_a_valid_tensor_chunk_both_ways():
    from communication.framing import chunk_message, parse_chunk
    from communication.proto import zerop2p_pb2 as pb

    header = pb.TensorHeader(key="g1/s0/u0/m0/barrier", sender=1, shape=[3], total_bytes=12)
    for n in (0, 1, 127, 128, 300_000):
        payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
        raw = chunk_message(header, memoryview(payload))
        parsed = pb.TensorChunk.FromString(raw)
        assert parsed.header == header and parsed.data == payload
        for message in (raw, pb.TensorChunk(header=header, data=payload).SerializeToString()):
            got_header, got = parse_chunk(message)
            assert got_header == header and bytes(got) == payload
            assert not n or got.obj is message  # a view into the received bytes, no copy
    assert parse_chunk(pb.TensorChunk(data=b"x").SerializeToString())[0] is None
