"""Collectives over gRPC: every collective is contributions pushed into receivers' slots.

[Note: algorithms]
- direct: each rank streams to every other rank exactly the part that rank needs (its rows of a
  reduce-scatter, its own shard for an all-gather, the whole value for an all-reduce); the
  receiver sums in rank order (accumulator.py). Per rank this sends and receives (W-1)/W of
  the data, the same bytes as a ring, with all streams running at once.
- ring (all-gather only, W >= RING_MIN_WORLD and shard >= RING_MIN_BYTES): rank r forwards the
  shard of origin r-t to rank r+1 at step t, so each rank keeps one outgoing stream instead of
  W-1. A ring reduce-scatter would sum in ring order, breaking the rank-order contract, so
  reduce-scatter is always direct.
- shift: one push to rank r+1 under the key; the slot expects one contribution, from rank r-1.
  Always the raw codec: a shift carries master copies, which are never compressed.
Codecs: all-gathers use ``param_codec``, reduce-scatters ``grad_codec``; all-reduces (grad norm,
loss, token counts), barriers and shifts are always raw, so scalars are exact. A lossy all-gather
gives every rank the same decoded rows, its own included (its shard goes through the same
encode/decode), and never takes the ring (forwarding would re-encode). A lossy reduce-scatter
with ``feedback`` adds the sender's residual to each outgoing part and keeps what the codec lost
(error feedback); the part a rank keeps for itself is never encoded, so its residual stays 0.
``bytes_sent`` counts every payload and header byte this rank pushed, by phase; ``links()``
the round trip and send rate to each peer (links.py); ``waiting()`` the oldest collective in
flight and the ranks that have not sent to it (waiting.py), for the progress reporter.
A collective completes on receipt: once every contribution is in this rank's slot and every
send has handed its bytes to gRPC, not when the peers acknowledge (completion.py).
Large contributions are cut into ranges sent on parallel streams (streams.py, from the core
count) so encoding, the wire and the receiver's copies overlap; each stream carries ~1 MiB chunks.

Inputs are held by reference (raw codec is zero-copy): callers must not modify a tensor they
passed until its future is done (by then gRPC holds its own copy). Tensors on CUDA travel
through CPU and come back to their device.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Future

import grpc
import torch

from communication.codec import DTYPE_NAMES, get_codec
from communication.collectives import CollectiveError, Key, Phase, completed
from communication.completion import complete, set_when_all
from communication.encoding import encode_parts
from communication.grpc_transport import GrpcTransport
from communication.peer_client import PeerCallError
from communication.peer_loss import PeerLoss
from communication.proto import zerop2p_pb2 as pb
from communication.ring import ring_gather
from communication.slot import Expectation, MissingContributions, Mode
from communication.streams import stream_ranges
from communication.views import ProgressViews

log = logging.getLogger(__name__)

RING_MIN_WORLD = 4
RING_MIN_BYTES = 1 << 20
RAW = get_codec("raw")
LOST_AFTER = 5.0  # a peer refusing connections this long is gone (it was up when we started)


class GrpcCollectives(ProgressViews):
    """The Collectives protocol for one generation, on a GrpcTransport."""

    def __init__(self, transport: GrpcTransport, *, rank: int, world_size: int, peers: list[str],
                 generation: int, timeout: float, codec: str = "raw",
                 param_codec: str | None = None, grad_codec: str | None = None):
        self.transport = transport
        self.rank = rank
        self.world_size = world_size
        self.peers = peers
        self.generation = generation
        self.timeout = timeout
        self.param_codec = get_codec(param_codec or codec)
        self.grad_codec = get_codec(grad_codec or codec)
        self.bytes_sent: dict[Phase, int] = {p: 0 for p in Phase}
        self._closed = False
        self._loss = PeerLoss(rank, peers)
        self._start_views(rank, peers)

    @classmethod
    def bind(cls, transport: GrpcTransport, *, rank: int, world_size: int, peers: list[str],
             generation: int, timeout: float = 60.0, codec: str = "raw",
             param_codec: str | None = None, grad_codec: str | None = None,
             members: list[str] | None = None) -> GrpcCollectives:
        """Collectives for one generation on ``transport``; older generations are refused.
        ``codec`` is the default for both ``param_codec`` and ``grad_codec``. ``members``: each
        rank's worker id (needed with mutual TLS: grpc_transport.py)."""
        if len(peers) != world_size:
            raise ValueError(f"{len(peers)} peer addresses for world size {world_size}")
        transport.bind(rank=rank, generation=generation, members=members, peers=list(peers))
        return cls(transport, rank=rank, world_size=world_size, peers=list(peers),
                   generation=generation, timeout=timeout, codec=codec,
                   param_codec=param_codec, grad_codec=grad_codec)

    # -- the protocol ----------------------------------------------------------------------

    def all_gather(self, key: Key, shard: torch.Tensor) -> Future[torch.Tensor]:
        """Concatenate every rank's equal-length 1-D shard in rank order."""
        if self.world_size == 1:
            return completed(shard.detach().clone())
        src = self._cpu(shard).reshape(-1)
        ring = (self.param_codec is RAW and self.world_size >= RING_MIN_WORLD
                and src.nbytes >= RING_MIN_BYTES)
        return self._run("all_gather", key, shard.device,
                         self._gather(key, src, ring=ring))

    def reduce_scatter(self, key: Key, full: torch.Tensor, *,
                       feedback: torch.Tensor | None = None) -> Future[torch.Tensor]:
        """Rank r receives the rank-order sum over ranks of full[r*S:(r+1)*S]. With a lossy
        grad codec, ``feedback`` (fp32, like ``full``, on CPU) is added to what is sent and
        replaced by what the codec lost; leave it alone until the future is done."""
        n, w = full.numel(), self.world_size
        if n % w:
            raise ValueError(f"reduce_scatter {key}: length {n} is not a multiple of world size "
                             f"{w}")
        if w == 1:
            return completed(full.detach().reshape(-1).clone())
        src = self._cpu(full).reshape(-1)
        s = n // w
        parts = [src[r * s:(r + 1) * s] for r in range(w)]
        codec = self.grad_codec
        if feedback is not None and codec is not RAW:
            if feedback.shape != src.shape or feedback.device.type != "cpu":
                raise ValueError(f"reduce_scatter {key}: feedback must be a CPU tensor of "
                                 f"{tuple(src.shape)}, got {tuple(feedback.shape)} on "
                                 f"{feedback.device}")
            feedback = feedback.view(-1)
        else:
            feedback = None  # raw: nothing is lost, nothing to feed back
        return self._run("reduce_scatter", key, full.device,
                         self._direct(key, parts, Mode.SUM, (s,), src.dtype, codec,
                                      feedback=feedback))

    def all_reduce(self, key: Key, value: torch.Tensor) -> Future[torch.Tensor]:
        """Every rank receives the rank-order element-wise sum of all ranks' value."""
        if self.world_size == 1:
            return completed(value.detach().clone())
        src = self._cpu(value)
        return self._run("all_reduce", key, value.device,
                         self._direct(key, [src] * self.world_size, Mode.SUM,
                                      tuple(src.shape), src.dtype, RAW))

    def barrier(self, key: Key) -> Future[None]:
        """Complete once every rank has entered with this key."""
        if self.world_size == 1:
            return completed(None)
        empty = torch.empty(0)
        return self._run("barrier", key, None,
                         self._direct(key, [empty] * self.world_size, Mode.CONCAT, (0,),
                                      torch.float32, RAW))

    def shift(self, key: Key, tensor: torch.Tensor) -> Future[torch.Tensor]:
        """Send tensor to rank+1, receive rank-1's (same shape and dtype on every rank)."""
        if self.world_size == 1:
            return completed(tensor.detach().clone())
        return self._run("shift", key, tensor.device, self._shift(key, self._cpu(tensor)))

    def close(self) -> None:
        """Stop issuing; the transport (and its server) stays up for the next generation."""
        self._closed = True
        try:
            self.transport.loop.call_soon_threadsafe(self._links.close)
        except RuntimeError:  # the transport's loop is already closed
            pass

    # -- machinery -------------------------------------------------------------------------

    @staticmethod
    def _cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous()

    def _run(self, op: str, key: Key, device: torch.device | None, coro) -> Future:
        if self._closed:
            coro.close()
            fut: Future = Future()
            fut.set_exception(CollectiveError(f"{op} {key}: collectives closed", rank=self.rank))
            return fut

        async def guarded():
            name = str(key)
            self._flight.begin(key, time.monotonic())
            try:
                out = await coro
            except CollectiveError:
                raise
            except MissingContributions as exc:
                lost = exc.missing[0]
                raise CollectiveError(
                    f"{op} {key} on rank {self.rank}: peer rank {lost} at {self.peers[lost]} "
                    f"sent nothing within {self.timeout:.1f}s (missing ranks {exc.missing})",
                    rank=lost, address=self.peers[lost]) from None
            except Exception as exc:  # noqa: BLE001 - name the op and key whatever failed
                raise CollectiveError(f"{op} {key} on rank {self.rank} failed: {exc}",
                                      rank=self.rank) from exc
            finally:
                self._flight.end(key)
                self.transport.accumulator.close(name, finished=False)
                self.transport.servicer.forget(name)
            return out if device is None or out is None else out.to(device)

        return self.transport.submit(guarded())

    def _open(self, key: Key, mode: Mode, shape: tuple[int, ...], dtype: torch.dtype,
              source: int | None = None):
        exp = Expectation(key=str(key), generation=self.generation, world_size=self.world_size,
                          shape=shape, dtype=dtype, mode=mode, source=source)
        return self.transport.accumulator.open(exp)

    async def _push(self, key: Key, dest: int, origin: int, t: torch.Tensor,
                    deadline: float, codec, wire: torch.Tensor | None = None,
                    handed: asyncio.Event | None = None) -> None:
        """Stream t (origin's contribution) to rank dest, split over parallel ranges if big;
        ``wire`` is t already encoded with ``codec`` (encoded here when not given). ``handed``
        is set once gRPC holds every byte; returns on the peer's acknowledgement."""
        if wire is None:
            wire = codec.encode(t) if t.numel() else torch.empty(0, dtype=torch.uint8)
        client = self.transport.client(self.peers[dest])
        n = wire.numel()
        ranges = stream_ranges(n)
        headers = [pb.TensorHeader(key=str(key), generation=self.generation, sender=self.rank,
                                   origin=origin, dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape),
                                   offset=a, total_bytes=b - a, codec=codec.name)
                   for a, b in ranges]
        size = n + sum(h.ByteSize() for h in headers)
        self.bytes_sent[key.phase] += size
        loop = asyncio.get_running_loop()
        out = [asyncio.Event() for _ in ranges] if handed is not None else [None] * len(ranges)
        calls = [loop.create_task(client.push(h, wire[a:b], deadline=deadline,
                                              unavailable_for=LOST_AFTER, handed=e))
                 for h, (a, b), e in zip(headers, ranges, out)]
        watch = None if handed is None else loop.create_task(set_when_all(out, handed))
        self._links.begin(dest)
        delivered = 0
        try:
            await asyncio.gather(*calls)
            delivered = size
            if handed is not None:
                handed.set()  # a reply before the last chunk went out (cannot happen: insurance)
        except PeerCallError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                self._loss.mark(dest)
            raise CollectiveError(
                f"{key} on rank {self.rank}: peer rank {dest} at {self.peers[dest]} did not "
                f"take our contribution: {exc}", rank=dest, address=self.peers[dest]) from None
        finally:
            self._links.end(dest, delivered)
            for task in (*calls, *([watch] if watch else [])):
                task.cancel()

    async def _finish(self, slot, sends: list) -> torch.Tensor:
        """The slot's result once complete (completion.py); sends still awaiting their
        acknowledgement go on in the transport, a late refusal marking the peer."""
        result = await complete(slot, sends, timeout=self.timeout, loss=self._loss,
                                hold=self.transport.hold)
        self.transport.accumulator.close(slot.expectation.key, finished=True)
        return result

    async def _direct(self, key: Key, parts: list[torch.Tensor], mode: Mode,
                      shape: tuple[int, ...], dtype: torch.dtype, codec,
                      feedback: torch.Tensor | None = None):
        """Send parts[r] to every rank r != self; keep our own; combine once all arrived.

        Parts that are one tensor (an all-gather's shard) are encoded once; with a lossy
        codec the rank keeps the decoded copy, as every peer will see it."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        slot = self._open(key, mode, shape, dtype)
        order = self._send_order()
        own, wires = encode_parts(parts, rank=self.rank, dests=order, codec=codec,
                                  feedback=feedback)
        slot.put(self.rank, own.view(shape))
        sends = [functools.partial(self._push, key, r, self.rank, parts[r].view(shape), deadline,
                                   codec, wires[r]) for r in order]
        out = await self._finish(slot, sends)
        return None if mode is Mode.CONCAT and shape == (0,) else out

    async def _shift(self, key: Key, src: torch.Tensor) -> torch.Tensor:
        w = self.world_size
        deadline = asyncio.get_running_loop().time() + self.timeout
        slot = self._open(key, Mode.CONCAT, tuple(src.shape), src.dtype,
                          source=(self.rank - 1) % w)
        send = functools.partial(self._push, key, (self.rank + 1) % w, self.rank, src, deadline,
                                 RAW)  # masters
        return await self._finish(slot, [send])

    def _send_order(self) -> list[int]:
        """Peers starting after our own rank, so no rank is everyone's first target."""
        w = self.world_size
        return [(self.rank + i) % w for i in range(1, w)]

    async def _gather(self, key: Key, src: torch.Tensor, *, ring: bool):
        if ring:
            return await ring_gather(self, key, src)
        return await self._direct(key, [src] * self.world_size, Mode.CONCAT, tuple(src.shape),
                                  src.dtype, self.param_codec)
