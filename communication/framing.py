"""Fast encoding of the Push stream's ``TensorFrame`` messages, byte-compatible with protobuf.

A data frame is field 2 (bytes) of TensorFrame: tag 0x12, a varint length, the payload. Writing
that prefix by hand costs one copy of the payload instead of two (slice to bytes, then protobuf
serialisation), and reading it returns a memoryview into the received message with no copy.
Anything else (the header frame, frames from other encoders) goes through protobuf.
"""

from __future__ import annotations

from communication.proto import zerop2p_pb2 as pb

_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def header_frame(header: pb.TensorHeader) -> bytes:
    """The serialised first frame of a Push stream."""
    return pb.TensorFrame(header=header).SerializeToString()


def data_frame(payload: memoryview) -> bytes:
    """A serialised TensorFrame{data: payload}, copying the payload once."""
    return b"".join((bytes((_DATA_TAG,)), _varint(len(payload)), payload))


def parse_frame(raw: bytes) -> pb.TensorHeader | memoryview:
    """A header, or the data payload as a zero-copy view into ``raw``."""
    if raw[:1] == b"\x12":
        n, shift, i = 0, 0, 1
        while i < len(raw) and i <= 10:
            b = raw[i]
            n |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                break
            shift += 7
        if i + n == len(raw):
            return memoryview(raw)[i:]
    frame = pb.TensorFrame.FromString(raw)
    if frame.WhichOneof("part") == "header":
        return frame.header
    return memoryview(frame.data)
