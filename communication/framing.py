"""Fast encoding of Push's ``TensorFrame`` and PushOne's ``TensorChunk``, byte-compatible
with protobuf.

A data frame is field 2 (bytes) of TensorFrame: tag 0x12, a varint length, the payload. Writing
that prefix by hand costs one copy of the payload instead of two (slice to bytes, then protobuf
serialisation), and reading it returns a memoryview into the received message with no copy.
A chunk is the header as field 1 (tag 0x0a), then the payload as field 2, written the same way.
Anything else (the header frame, messages from other encoders) goes through protobuf.

Bytes that decode as neither raise ``FrameError``. The server's deserializers (``tolerant``)
turn that into an ``Undecodable`` value instead of an exception, so the handler answers
INVALID_ARGUMENT naming the problem: an exception inside a gRPC deserializer leaves the call
as UNKNOWN, which tells the sender nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError

from communication.proto import zerop2p_pb2 as pb

_HEADER_TAG = 0x0A  # field 1, wire type 2 (length-delimited)
_DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)


class FrameError(ValueError):
    """Bytes that are not the message they were sent as (truncated, wrong tags, bad UTF-8)."""


class Undecodable:
    """What a tolerant deserializer returns for bytes that raised ``FrameError``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"Undecodable({self.reason!r})"


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse`` as a gRPC request deserializer that never raises: Undecodable instead."""

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (FrameError, DecodeError) as exc:
            return Undecodable(str(exc))

    deserialize.__name__ = f"tolerant_{getattr(parse, '__name__', 'parse')}"
    return deserialize


def _decode(message: type, raw: bytes | memoryview) -> Any:
    """``message.FromString(raw)``; FrameError naming the message type and size on failure."""
    try:
        return message.FromString(raw)
    except DecodeError as exc:
        raise FrameError(f"undecodable {message.__name__} of {len(raw)} bytes: {exc}") from None


def parser(message: type) -> Callable[[bytes], Any]:
    """``message.FromString`` raising FrameError instead (for messages with no fast path)."""
    return functools.partial(_decode, message)


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


def _prefix(tag: int, n: int) -> bytes:
    """A length-delimited field's tag and varint length."""
    return bytes((tag,)) + _varint(n)


def header_frame(header: pb.TensorHeader) -> bytes:
    """The serialised first frame of a Push stream: TensorFrame{header}."""
    h = header.SerializeToString()
    return _prefix(_HEADER_TAG, len(h)) + h


def data_frame(payload: memoryview) -> bytes:
    """A serialised TensorFrame{data: payload}, copying the payload once."""
    return b"".join((_prefix(_DATA_TAG, len(payload)), payload))


def chunk_message(header: pb.TensorHeader, payload: memoryview) -> bytes:
    """A serialised TensorChunk{header, data: payload}, copying the payload once (TensorChunk
    numbers its fields as TensorFrame does, so it is a header frame followed by a data field)."""
    return b"".join((header_frame(header), _prefix(_DATA_TAG, len(payload)), payload))


def _field(raw: bytes, i: int, tag: int) -> tuple[int, int] | None:
    """(start, end) of the length-delimited field ``tag`` at ``raw[i]``, or None."""
    if raw[i:i + 1] != bytes((tag,)):
        return None
    n, shift, i = 0, 0, i + 1
    while i < len(raw) and shift <= 63:
        b = raw[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return (i, i + n) if i + n <= len(raw) else None
        shift += 7
    return None


def parse_frame(raw: bytes) -> pb.TensorHeader | memoryview:
    """A header, or the data payload as a zero-copy view into ``raw``; FrameError if neither."""
    data = _field(raw, 0, _DATA_TAG)
    if data is not None and data[1] == len(raw):
        return memoryview(raw)[data[0]:]
    frame = _decode(pb.TensorFrame, raw)
    if frame.WhichOneof("part") == "header":
        return frame.header
    return memoryview(frame.data)


def parse_chunk(raw: bytes) -> tuple[pb.TensorHeader | None, memoryview]:
    """The header (None if the chunk has none) and a zero-copy view of the payload;
    FrameError if ``raw`` is no TensorChunk."""
    head = _field(raw, 0, _HEADER_TAG)
    if head is not None:
        header = _decode(pb.TensorHeader, memoryview(raw)[head[0]:head[1]])
        if head[1] == len(raw):  # protobuf leaves out an empty bytes field
            return header, memoryview(b"")
        data = _field(raw, head[1], _DATA_TAG)
        if data is not None and data[1] == len(raw):
            return header, memoryview(raw)[data[0]:]
    chunk = _decode(pb.TensorChunk, raw)
    return chunk.header if chunk.HasField("header") else None, memoryview(chunk.data)
