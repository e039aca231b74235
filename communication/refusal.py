"""How the peer server says no: ``PushRefused`` carries the status and a message naming the
key, sender and mismatch, and ``drain`` reads what the client still streams (bounded) before
the answer goes out, so the message reaches the client."""

from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger(__name__)

# A refused stream is read on (and dropped) before the answer, so the status reaches the
# client (see drain): 8 chunks, 5 s at most. A longer one sees its call cut off instead.
MAX_DRAIN_BYTES = 8 << 20  # 8 chunks of 1 MiB (peer_server.MAX_CHUNK_BYTES)
MAX_DRAIN_FRAMES = 64
DRAIN_WAIT = 5.0


class PushRefused(Exception):
    """A contribution refused with ``code``; the message names the key, sender and mismatch."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


async def drain(frames, context) -> None:
    """Read and drop what the client still streams (up to MAX_DRAIN_BYTES in MAX_DRAIN_FRAMES
    frames, within DRAIN_WAIT and the call's deadline) before answering: a server that answers
    while the client is still writing can have its status replaced by INTERNAL on the client's
    side (grpc/grpc#36066), losing the message that names the problem. Past the bounds the
    answer goes out anyway (a long refused stream may then see INTERNAL or CANCELLED)."""
    async def read() -> None:
        seen = 0
        for _ in range(MAX_DRAIN_FRAMES):
            frame = await anext(frames, None)
            if frame is None:
                return
            seen += len(frame) if isinstance(frame, memoryview) else 0
            if seen >= MAX_DRAIN_BYTES:
                return

    remaining = context.time_remaining()
    wait = DRAIN_WAIT if remaining is None else min(DRAIN_WAIT, max(remaining, 0))
    try:
        await asyncio.wait_for(read(), wait)
    except asyncio.TimeoutError:
        log.warning("a refused stream was still open after %.1fs; answering anyway", wait)
