"""What a worker builds for islands: the outer transport and, per generation, the OuterSync."""

from __future__ import annotations

import logging

import torch

from communication.grpc_transport import GrpcTransport
from worker.engine.zero3 import Zero3Engine
from worker.islands.config import IslandConfig
from worker.islands.federated import FederatedMerge
from worker.islands.outer import OuterSync, RoundSource
from worker.models.lora import LoraSettings

log = logging.getLogger(__name__)


def start_outer_transport(islands: IslandConfig, *, bind_host: str, port: int,
                          token: str | None, tls=None) -> GrpcTransport | None:
    """The second gRPC server, for the exchange between islands (None with one island); with
    ``tls`` (the worker's certificate) it speaks mutual TLS like the inner one."""
    if not islands.enabled:
        return None
    transport = GrpcTransport(host=bind_host, port=port, token=token, tls=tls)
    log.info("site %s: outer server on %s:%d", islands.site, bind_host, transport.port)
    return transport


def build_outer(islands: IslandConfig, engine: Zero3Engine, transport: GrpcTransport | None,
                source: RoundSource, *, generation: int, rank: int, world_size: int,
                timeout: float, lora: LoraSettings | None = None) -> OuterSync | None:
    """This generation's outer loop over ``engine``'s owned slices (None with one island);
    with LoRA, rounds between islands of different adapter ranks merge products instead."""
    if not islands.enabled:
        return None
    if transport is None:
        raise ValueError(f"site {islands.site}: islands need the outer transport")
    return OuterSync(config=islands, params=engine.parameters(), transport=transport,
                     source=source, generation=generation, rank=rank, world_size=world_size,
                     timeout=timeout, refresh=engine.replicated.refresh,
                     federated=None if lora is None else FederatedMerge(engine, lora,
                                                                        timeout=timeout))


def island_max(engine: Zero3Engine, value: int) -> int:
    """The largest ``value`` over the island's ranks (so that every rank decides alike)."""
    world, rank = engine.collectives.world_size, engine.collectives.rank
    slots = torch.zeros(world, dtype=torch.float64)
    slots[rank] = float(value)
    return int(engine.all_reduce_sum(slots).max())
