"""The worker's gRPC server: receives contributions into the accumulator; answers pings.

A Push stream is one header then raw byte chunks; PushOne carries a header and its bytes in one
message (contributions of at most one chunk). The header is validated against the slot
the local rank opened for that key before any byte is read (INVALID_ARGUMENT naming the
mismatch, nothing changed); the bytes are copied straight into the slot's preallocated buffer
(raw codec) or into a staging buffer that is decoded once complete. A contribution may arrive as
several byte ranges (offsets) on parallel streams, all with the codec of its first range; it
counts once its ranges cover every byte. A range that overlaps or repeats one already in (or
on its way) is refused, so coverage is exact: lengths adding up cannot hide a gap.

[Note: bounds]
What a peer, or anyone who can reach the port, can make this server hold or wait for:
- one message: MAX_MESSAGE_BYTES, one chunk plus a header margin. gRPC refuses a larger one
  from its length prefix, before reading it: a unary call's token refusal (auth.py) runs only
  once its message is read, so this limit is what bounds an unauthenticated caller.
- calls at once: MAX_CONCURRENT_RPCS (gRPC answers RESOURCE_EXHAUSTED beyond it).
- per sender rank: ServerLimits.open_per_sender calls inside the servicer and
  ServerLimits.bytes_per_sender bytes announced by them (RESOURCE_EXHAUSTED naming the cap,
  the sender and the key).
- time: a push waits for its key at most ServerLimits.max_wait, whatever the caller's deadline;
  the wait ends when the call is cancelled or its generation superseded (accumulator.py), and a
  partial contribution's receive state (and staging buffer) is dropped when its last range on
  the way is cancelled or refused with none in.
- a refused stream is drained (refusal.py) for at most MAX_DRAIN_BYTES / MAX_DRAIN_FRAMES /
  DRAIN_WAIT.
Undecodable messages are answered INVALID_ARGUMENT (framing.tolerant), never UNKNOWN.
With mutual TLS (mtls.py) only certified peers connect at all, and a push whose sender rank is
not the caller's own certificate is refused with PERMISSION_DENIED (``senders``: identity.py's
note), checked before the per-sender caps are touched and again once its slot opened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from communication.accumulator import Accumulator
from communication.auth import TlsConfig, TokenInterceptor
from communication.codec import dtype_from_name, get_codec
from communication.framing import Undecodable, parse_chunk, parse_frame, parser, tolerant
from communication.identity import SenderCheck
from communication.intake import CapReached, Incoming, SenderLedger
from communication.mtls import MutualTls
from communication.proto import zerop2p_pb2 as pb
from communication.refusal import PushRefused, drain
from communication.slot import ContributionError, Slot

log = logging.getLogger(__name__)

# The largest payload one message carries: peer_client.CHUNK_BYTES (stated here because
# peer_client imports this module; tests/test_peer_bounds.py checks that they agree). Bytes up
# to one chunk go as one PushOne, more as a Push stream of chunks.
MAX_CHUNK_BYTES = 1 << 20
HEADER_MARGIN = 64 << 10  # a TensorHeader (key, shape, names) plus field prefixes: < 1 KiB
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + HEADER_MARGIN
# Legitimate peak per peer: MAX_STREAMS (<= 4) ranges for each of the ~3 keys a sender can be
# ahead by (collectives complete on receipt), plus pings: ~13. 128 serves ~9 peers at that
# peak, and bounds what a flood of calls can hold to ~128 messages of MAX_MESSAGE_BYTES.
MAX_CONCURRENT_RPCS = 128
DEFAULT_WAIT = 60.0  # a call without a deadline waits this long for its key
MAX_WAIT = 300.0  # and one with a deadline at most this long: 5x the default collective timeout
MAX_OPEN_PER_SENDER = 32  # ~2.5x the legitimate peak above
MAX_BYTES_PER_SENDER = 2 << 30  # a sender's contributions to its keys in flight, with room


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerLimits:
    """The per-call and per-sender bounds of one servicer (the note above)."""

    max_wait: float = MAX_WAIT
    open_per_sender: int = MAX_OPEN_PER_SENDER
    bytes_per_sender: int = MAX_BYTES_PER_SENDER

    def __post_init__(self) -> None:
        if not (self.max_wait > 0 and self.open_per_sender > 0 and self.bytes_per_sender > 0):
            raise ValueError(f"invalid server limits: max_wait({self.max_wait}), "
                             f"open_per_sender({self.open_per_sender}) and "
                             f"bytes_per_sender({self.bytes_per_sender}) must all be > 0")


class PeerServicer:
    """Push, PushOne and Ping for one rank; generation and rank are read live from the transport.

    Registered through a generic handler (``_handlers``) rather than generated service stubs,
    whose grpcio version guard would refuse older runtimes (none are generated)."""

    def __init__(self, accumulator: Accumulator, *, rank: Callable[[], int],
                 generation: Callable[[], int], limits: ServerLimits | None = None,
                 senders: SenderCheck | None = None):
        """``senders``: with mutual TLS, who may push as which rank (identity.py's note)."""
        self._acc = accumulator
        self._rank = rank
        self._generation = generation
        self.limits = limits or ServerLimits()
        self.senders = senders
        self.ledger = SenderLedger(open_calls=self.limits.open_per_sender,
                                   in_flight_bytes=self.limits.bytes_per_sender)
        self._incoming: dict[tuple[str, int], Incoming] = {}

    async def Ping(self, request, context):  # noqa: N802 - gRPC method name
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Ping: {request.reason}")
        return pb.PingReply(rank=self._rank(), generation=self._generation())

    async def Push(self, request_iterator, context):  # noqa: N802 - gRPC method name
        try:
            h = await anext(aiter(request_iterator), None)
            if isinstance(h, Undecodable):
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, f"Push: {h.reason}")
            if not isinstance(h, pb.TensorHeader):
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, "Push must start with a header")
            reply = await self._receive(h, request_iterator, context)
        except PushRefused as refusal:
            await drain(request_iterator, context)
            await context.abort(refusal.code, refusal.message)
        if reply.duplicate:
            await drain(request_iterator, context)
        return reply

    async def PushOne(self, request, context):  # noqa: N802 - gRPC method name
        try:
            if isinstance(request, Undecodable):
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, f"PushOne: {request.reason}")
            h, data = request
            if h is None:
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, "PushOne without a header")
            return await self._receive(h, _once(data), context, held=len(data))
        except PushRefused as refusal:
            await context.abort(refusal.code, refusal.message)

    async def _receive(self, h: pb.TensorHeader, data_frames, context, held: int = 0
                       ) -> pb.PushReply:
        """Validate ``h`` against its slot, copy the frames' bytes into place, count them.
        Raises PushRefused (the caller answers it); a duplicate's frames are left unread.
        ``held``: bytes of this call already in memory (PushOne's)."""
        who = f"key {h.key} sender {h.sender}"
        if h.offset < 0 or h.total_bytes < 0:
            raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{who}: byte range offset {h.offset}, length {h.total_bytes}")
        current = self._generation()
        if h.generation < current:
            raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{who}: generation expected {current}, actual {h.generation} "
                               f"(stale)")
        if self.senders is not None:  # before the claimed sender's caps are touched
            self.senders.check(h, context, known_only=True)
        try:
            held_here = self.ledger.hold(h.sender, max(h.total_bytes, held), key=h.key)
        except CapReached as exc:
            raise PushRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        with held_here:
            slot = await self._slot(h, context)
            if self.senders is not None and slot is not None:  # its generation is bound now
                self.senders.check(h, context)
            if slot is None or slot.has(h.origin):
                return pb.PushReply(received_bytes=0, duplicate=True)
            try:
                incoming = self._validate(slot, h)
            except ContributionError as exc:
                raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            try:
                pos = await incoming.write(h, data_frames)
            except BaseException as exc:  # refused, broken or cancelled: the range is not in
                if incoming.release(h.offset):
                    self._drop(slot, h, incoming)
                if isinstance(exc, ContributionError):
                    raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
                raise
            whole = incoming.finish(h.offset)
            if whole and self._incoming.get((h.key, h.origin)) is incoming:
                self._complete(slot, h, incoming)
            return pb.PushReply(received_bytes=pos)

    async def _slot(self, h: pb.TensorHeader, context) -> Slot | None:
        """h's slot once the local rank opens it, waiting at most the caller's deadline and
        never more than limits.max_wait."""
        remaining = context.time_remaining()
        wait = min(self.limits.max_wait, DEFAULT_WAIT if remaining is None else max(remaining, 0))
        try:
            return await self._acc.slot(h.key, wait, generation=h.generation)
        except TimeoutError:
            raise PushRefused(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"key {h.key} sender {h.sender}: rank {self._rank()} did not open "
                               f"it within {wait:.3g}s (server cap {self.limits.max_wait:.0f}s)"
                               ) from None
        except ContributionError as exc:
            raise PushRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"sender {h.sender}: {exc}") from None

    def _validate(self, slot: Slot, h) -> Incoming:
        """Check the header against the slot and claim its byte range in the receive state of
        its origin (created by the first range); ContributionError changes nothing."""
        try:
            dtype = dtype_from_name(h.dtype)
            codec = get_codec(h.codec)
        except ValueError as exc:
            raise ContributionError(f"key {h.key} sender {h.sender}: {exc}") from None
        slot.check(sender=h.origin, generation=h.generation, shape=tuple(h.shape), dtype=dtype)
        ident = (h.key, h.origin)
        incoming = self._incoming.get(ident)
        if incoming is None:
            total = codec.wire_bytes(slot.expectation.numel, dtype)
            dst = slot.buffer(h.origin)
            wire = dst.view(torch.uint8) if codec.name == "raw" else torch.empty(
                total, dtype=torch.uint8)
            incoming = self._incoming[ident] = Incoming(codec.name, total, wire)
        try:
            incoming.claim(h)
        except ContributionError:
            if incoming.idle():  # the range was its first: forget it again
                self._drop(slot, h, incoming)
            raise
        return incoming

    def _complete(self, slot: Slot, h, incoming: Incoming) -> None:
        codec = get_codec(incoming.codec)
        dst = slot.buffer(h.origin)
        if codec.name != "raw":
            dst.copy_(codec.decode(incoming.wire, slot.expectation.numel, dst.dtype))
        del self._incoming[(h.key, h.origin)]
        slot.commit(h.origin)

    def _drop(self, slot: Slot, h, incoming: Incoming) -> None:
        """Forget a receive state with nothing in or on its way, and its staging buffer."""
        if self._incoming.get((h.key, h.origin)) is incoming:
            del self._incoming[(h.key, h.origin)]
            slot.discard(h.origin)

    def receiving(self) -> int:
        """How many contributions are partly received (0 once every receive has ended)."""
        return len(self._incoming)

    def forget(self, key: str) -> None:
        """Drop partial receive state of a key that finished or failed."""
        for ident in [i for i in self._incoming if i[0] == key]:
            del self._incoming[ident]


async def _once(data: memoryview):
    """PushOne's bytes as the one data frame of a stream (none if empty)."""
    if len(data):
        yield data


def _handlers(servicer: PeerServicer) -> grpc.GenericRpcHandler:
    """The Peer service with Push frames and PushOne chunks parsed by framing.py (zero-copy
    data); an undecodable message reaches the handler as framing.Undecodable."""
    return grpc.method_handlers_generic_handler("zerop2p.Peer", {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=tolerant(parse_frame),
            response_serializer=pb.PushReply.SerializeToString),
        "PushOne": grpc.unary_unary_rpc_method_handler(
            servicer.PushOne, request_deserializer=tolerant(parse_chunk),
            response_serializer=pb.PushReply.SerializeToString),
        "Ping": grpc.unary_unary_rpc_method_handler(
            servicer.Ping, request_deserializer=tolerant(parser(pb.PingRequest)),
            response_serializer=pb.PingReply.SerializeToString),
    })


def channel_options() -> list[tuple[str, int]]:
    """Message size limits (MAX_MESSAGE_BYTES), shared by server and client."""
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


async def create_server(servicer: PeerServicer, *, host: str = "127.0.0.1", port: int = 0,
                        token: str | None = None, tls: TlsConfig | MutualTls | None = None,
                        max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS
                        ) -> tuple[grpc.aio.Server, int]:
    """Start the peer server; returns it and the bound port (port 0 picks a free one)."""
    interceptors = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=channel_options(),
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, tls.server_credentials()) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"could not bind the peer server to {address}")
    await server.start()
    log.info("peer server listening on %s:%d%s", host, bound, " (TLS)" if tls else "")
    return server, bound
