"""The ring all-gather (grpc_collectives.py's note on algorithms): rank r forwards the shard of
origin r-t to rank r+1 at step t, so each rank keeps one outgoing stream instead of W-1. Each
shard is forwarded once it has arrived and the previous one has been handed to gRPC (not once
it is acknowledged), so a step costs one one-way delay."""

from __future__ import annotations

import asyncio

import torch

from communication.codec import get_codec
from communication.collectives import Key
from communication.completion import handed_or_failed
from communication.slot import Mode

RAW = get_codec("raw")  # the registry's one instance: ``codec is RAW`` holds


async def ring_gather(coll, key: Key, src: torch.Tensor) -> torch.Tensor:
    """``coll``'s all-gather of ``src`` around the ring (raw codec only: forwarding a lossy
    shard would re-encode it)."""
    deadline = asyncio.get_running_loop().time() + coll.timeout
    slot = coll._open(key, Mode.CONCAT, tuple(src.shape), src.dtype)
    slot.put(coll.rank, src)
    w, nxt = coll.world_size, (coll.rank + 1) % coll.world_size

    async def forward(handed: asyncio.Event):
        loop, pushes = asyncio.get_running_loop(), []
        for step in range(w - 1):
            origin = (coll.rank - step) % w
            await slot.arrived(origin)
            out = asyncio.Event()
            pushes.append(loop.create_task(coll._push(key, nxt, origin, slot.buffer(origin),
                                                      deadline, RAW, handed=out)))
            await handed_or_failed(pushes[-1], out)
        handed.set()
        try:
            await asyncio.gather(*pushes)
        finally:
            for push in pushes:
                push.cancel()

    return await coll._finish(slot, [forward])
