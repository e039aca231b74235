"""Full weights assembled from every rank's owned slices, one unit at a time (final output,
parity checks): a collective every rank runs with the same arguments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from communication.collectives import Collectives, Key, Phase, result
from worker.engine.config import ShardConfig
from worker.engine.replicated import ReplicatedParams
from worker.engine.unit import ShardedUnit


class ShardedModel(Protocol):
    """What this module reads of the engine (which calls it: no import back)."""

    units: list[ShardedUnit]
    replicated: ReplicatedParams
    collectives: Collectives
    config: ShardConfig
    generation: int
    step_index: int
    collective_counts: dict[Phase, int]


def iter_full_weights(engine: ShardedModel, *, index: int, trainable_only: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 tensor) per parameter; ``index`` tells this call's all-gathers
    from other calls' in the same step. Replicated weights (frozen ones replicated by the
    traffic policy, and parameters below the persistence threshold) are read, not gathered."""
    for unit in engine.units:
        if trainable_only and not unit.trains:
            continue
        gather_frozen = not trainable_only and unit.gathered_frozen > 0
        own = unit.master.detach().float()
        shard = torch.cat([own, unit.frozen.float()]) if gather_frozen else own
        rows = torch.empty(engine.collectives.world_size, 0)
        if shard.numel():  # every rank has the same row length: all skip, or none
            key = Key(generation=engine.generation, phase=Phase.GATHER_WEIGHTS,
                      step=engine.step_index, unit=unit.index, index=index)
            engine.collective_counts[Phase.GATHER_WEIGHTS] += 1
            rows = result(engine.collectives.all_gather(key, shard), key=key,
                          rank=engine.collectives.rank, timeout=engine.config.timeout)
            rows = rows.view(engine.collectives.world_size, shard.numel()).cpu()
        train = rows[:, : unit.trainable_shard].reshape(-1)
        if gather_frozen:
            frozen = rows[:, unit.trainable_shard :].reshape(-1)
        elif not trainable_only and unit.replicate_frozen:  # every element is here already
            frozen = unit.frozen_full.detach().float().cpu()
        for slot in unit.layout.slots:
            if trainable_only and not slot.trainable:
                continue
            region = train if slot.trainable else frozen
            yield slot.name, region[slot.offset : slot.offset + slot.numel].view(slot.shape).clone()
    for (name, _), master in zip(engine.replicated.trainable, engine.replicated.masters):
        yield name, master.detach().float().cpu().clone()  # whole on every rank: no collective
    if not trainable_only:
        for name, p in engine.replicated.frozen:
            yield name, p.detach().float().cpu().clone()
