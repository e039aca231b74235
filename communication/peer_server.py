"""The worker's gRPC server: receives contributions into the accumulator; answers pings.

A Push stream is one header then raw byte chunks; PushOne carries a header and its bytes in one
message (contributions of at most one chunk). The header is validated against the slot
the local rank opened for that key before any byte is read (INVALID_ARGUMENT naming the
mismatch, nothing changed); the bytes are copied straight into the slot's preallocated buffer
(raw codec) or into a staging buffer that is decoded once complete. A contribution may arrive as
several byte ranges (offsets) on parallel streams; it counts once all its bytes are in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import torch

from communication.accumulator import Accumulator
from communication.auth import TlsConfig, TokenInterceptor
from communication.codec import dtype_from_name, get_codec
from communication.framing import parse_chunk, parse_frame
from communication.proto import zerop2p_pb2 as pb
from communication.slot import ContributionError, Slot

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # chunks are ~1 MiB; this only bounds a bad peer
DEFAULT_WAIT = 60.0
MAX_DRAIN_BYTES = 1 << 30  # a refused stream is read to its end, up to this much, then cut off


class _Incoming:
    """Receive state of one origin's contribution inside a slot (its byte ranges so far)."""

    __slots__ = ("wire", "ranges", "total")

    def __init__(self, total: int, wire: torch.Tensor):
        self.total = total
        self.wire = wire  # uint8 destination of the encoded bytes
        self.ranges: dict[int, int] = {}


class PeerServicer:
    """Push, PushOne and Ping for one rank; generation and rank are read live from the transport.

    Registered through a generic handler (``_handlers``) rather than generated service stubs,
    whose grpcio version guard would refuse older runtimes (none are generated)."""

    def __init__(self, accumulator: Accumulator, *, rank: Callable[[], int],
                 generation: Callable[[], int]):
        self._acc = accumulator
        self._rank = rank
        self._generation = generation
        self._incoming: dict[tuple[str, int], _Incoming] = {}

    async def Ping(self, request, context):  # noqa: N802 - gRPC method name
        return pb.PingReply(rank=self._rank(), generation=self._generation())

    async def Push(self, request_iterator, context):  # noqa: N802 - gRPC method name
        try:
            h = await anext(aiter(request_iterator), None)
            if not isinstance(h, pb.TensorHeader):
                raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT, "Push must start with a header")
            reply = await self._receive(h, request_iterator, context)
        except _PushRefused as refusal:
            await _drain(request_iterator, context)
            await context.abort(refusal.code, refusal.message)
        if reply.duplicate:
            await _drain(request_iterator, context)
        return reply

    async def PushOne(self, request, context):  # noqa: N802 - gRPC method name
        h, data = request
        try:
            if h is None:
                raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT, "PushOne without a header")
            return await self._receive(h, _once(data), context)
        except _PushRefused as refusal:
            await context.abort(refusal.code, refusal.message)

    async def _receive(self, h: pb.TensorHeader, data_frames, context) -> pb.PushReply:
        """Validate ``h`` against its slot, copy the frames' bytes into place, count them.
        Raises _PushRefused (the caller answers it); a duplicate's frames are left unread."""
        current = self._generation()
        if h.generation < current:
            raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"key {h.key} sender {h.sender}: generation expected {current}, "
                           f"actual {h.generation} (stale)")
        wait = context.time_remaining() or DEFAULT_WAIT
        try:
            slot = await self._acc.slot(h.key, wait)
        except TimeoutError:
            raise _PushRefused(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"key {h.key}: rank {self._rank()} never opened it") from None
        if slot is None or slot.has(h.origin):
            return pb.PushReply(received_bytes=0, duplicate=True)
        try:
            incoming = self._validate(slot, h)
        except ContributionError as exc:
            raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        dest = memoryview(incoming.wire[h.offset:h.offset + h.total_bytes].numpy())
        pos = 0
        async for data in data_frames:
            if not isinstance(data, memoryview):
                raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"key {h.key} sender {h.sender}: a second header")
            end = pos + len(data)
            if end > h.total_bytes:
                raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"key {h.key} sender {h.sender}: more than the announced "
                               f"{h.total_bytes} bytes")
            dest[pos:end] = data
            pos = end
        if pos != h.total_bytes:
            raise _PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"key {h.key} sender {h.sender}: expected {h.total_bytes} bytes, "
                           f"actual {pos}")
        if not slot.has(h.origin):
            incoming.ranges[h.offset] = h.total_bytes
            if sum(incoming.ranges.values()) == incoming.total:
                self._complete(slot, h, incoming)
        return pb.PushReply(received_bytes=pos)

    def _validate(self, slot: Slot, h) -> _Incoming:
        """Check the header against the slot; the receive state for its origin (created once)."""
        try:
            dtype = dtype_from_name(h.dtype)
            codec = get_codec(h.codec)
        except ValueError as exc:
            raise ContributionError(f"key {h.key} sender {h.sender}: {exc}") from None
        slot.check(sender=h.origin, generation=h.generation, shape=tuple(h.shape), dtype=dtype)
        total = codec.wire_bytes(slot.expectation.numel, dtype)
        if h.offset < 0 or h.offset + h.total_bytes > total:
            raise ContributionError(
                f"key {h.key} sender {h.sender}: byte range [{h.offset}, "
                f"{h.offset + h.total_bytes}) outside the expected {total} bytes")
        ident = (h.key, h.origin)
        incoming = self._incoming.get(ident)
        if incoming is None:
            dst = slot.buffer(h.origin)
            raw = codec.name == "raw"
            wire = dst.view(torch.uint8) if raw else torch.empty(total, dtype=torch.uint8)
            incoming = self._incoming[ident] = _Incoming(total, wire)
        return incoming

    def _complete(self, slot: Slot, h, incoming: _Incoming) -> None:
        codec = get_codec(h.codec)
        dst = slot.buffer(h.origin)
        if codec.name != "raw":
            dst.copy_(codec.decode(incoming.wire, slot.expectation.numel, dst.dtype))
        del self._incoming[(h.key, h.origin)]
        slot.commit(h.origin)

    def forget(self, key: str) -> None:
        """Drop partial receive state of a key that finished or failed."""
        for ident in [i for i in self._incoming if i[0] == key]:
            del self._incoming[ident]


class _PushRefused(Exception):
    """A contribution refused with ``code``; the message names the key, sender and mismatch."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


async def _drain(frames, context) -> None:
    """Read and drop what the client still streams (up to MAX_DRAIN_BYTES, within the call's
    deadline) before answering: a server that answers while the client is still writing can
    have its status replaced by INTERNAL on the client's side (grpc/grpc#36066), losing the
    message that names the problem."""
    async def read() -> None:
        seen = 0
        async for frame in frames:
            seen += len(frame) if isinstance(frame, memoryview) else 0
            if seen > MAX_DRAIN_BYTES:
                return

    try:
        await asyncio.wait_for(read(), context.time_remaining() or DEFAULT_WAIT)
    except asyncio.TimeoutError:
        log.warning("a refused stream was still open at its deadline; answering anyway")


async def _once(data: memoryview):
    """PushOne's bytes as the one data frame of a stream (none if empty)."""
    if len(data):
        yield data


def _handlers(servicer: PeerServicer) -> grpc.GenericRpcHandler:
    """The Peer service with Push frames and PushOne chunks parsed by framing.py (zero-copy
    data)."""
    return grpc.method_handlers_generic_handler("zerop2p.Peer", {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=parse_frame,
            response_serializer=pb.PushReply.SerializeToString),
        "PushOne": grpc.unary_unary_rpc_method_handler(
            servicer.PushOne, request_deserializer=parse_chunk,
            response_serializer=pb.PushReply.SerializeToString),
        "Ping": grpc.unary_unary_rpc_method_handler(
            servicer.Ping, request_deserializer=pb.PingRequest.FromString,
            response_serializer=pb.PingReply.SerializeToString),
    })


def channel_options() -> list[tuple[str, int]]:
    """Explicit message size limits, shared by server and client."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


async def create_server(servicer: PeerServicer, *, host: str = "127.0.0.1", port: int = 0,
                        token: str | None = None, tls: TlsConfig | None = None
                        ) -> tuple[grpc.aio.Server, int]:
    """Start the peer server; returns it and the bound port (port 0 picks a free one)."""
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=channel_options())
    server.add_generic_rpc_handlers((_handlers(servicer),))
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, tls.server_credentials()) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"could not bind the peer server to {address}")
    await server.start()
    log.info("peer server listening on %s:%d%s", host, bound, " (TLS)" if tls else "")
    return server, bound
