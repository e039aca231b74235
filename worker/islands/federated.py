"""Federated LoRA rounds between islands whose adapters have different ranks (FlexLoRA).

Counterparts of islands with different LoRA ranks do not own the same elements, so the
element-wise DiLoCo average cannot run. Instead every island gathers its full adapters (small:
LoRA only), the counterparts all-gather them (padded to the longest), and every rank merges
them with lora_merge.py: the token-weighted mean of the products s_i B_i A_i, truncated to this
island's own rank. Each rank keeps its owned slices of the result. Every island computes the
same merge from the same inputs, so an island that joins (weight 0) receives it too.
"""

from __future__ import annotations

import logging

import torch

from communication.collectives import Key, Phase, result
from communication.grpc_collectives import GrpcCollectives
from worker.engine.sharding import owned_range, region_slice
from worker.engine.zero3 import Zero3Engine
from worker.islands.lora_merge import merge_adapter_states
from worker.models.lora import LoraSettings

log = logging.getLogger(__name__)

COLUMNS = 4  # per island: flat length, LoRA rank, LoRA alpha, weight


class FederatedMerge:
    """One rank's part of a heterogeneous-rank LoRA round; see the module docstring."""

    def __init__(self, engine: Zero3Engine, lora: LoraSettings, *, timeout: float) -> None:
        self.engine = engine
        self.lora = lora
        self.timeout = timeout

    def _key(self, number: int, phase: Phase, index: int) -> Key:
        return Key(generation=number, phase=phase, step=number, index=index)

    def describe(self, coll: GrpcCollectives, number: int, weight: float, numel: int, *,
                 index: int) -> torch.Tensor:
        """Every island's (flat length, rank, alpha, weight), one row per group rank."""
        table = torch.zeros(coll.world_size, COLUMNS, dtype=torch.float64)
        table[coll.rank] = torch.tensor([numel, self.lora.rank, self.lora.alpha, weight],
                                        dtype=torch.float64)
        key = self._key(number, Phase.OUTER_WEIGHT, index)
        summed = result(coll.all_reduce(key, table.reshape(-1)), key=key, rank=coll.rank,
                        timeout=self.timeout)
        return summed.view(coll.world_size, COLUMNS)

    def ranks_differ(self, coll: GrpcCollectives, number: int) -> bool:
        """Whether the islands of this round train adapters of different ranks."""
        table = self.describe(coll, number, 0.0, 0, index=1)
        return len({int(r) for r in table[:, 1]}) > 1

    def merge(self, coll: GrpcCollectives, number: int, weight: float) -> float:
        """The round: gather, exchange, merge, keep this island's rank. Returns the total weight."""
        full = dict(self.engine.iter_full_weights(trainable_only=True))  # island-wide collective
        names = sorted(full)
        flat = torch.cat([full[n].reshape(-1) for n in names])
        table = self.describe(coll, number, weight, flat.numel(), index=2)
        total = float(table[:, 3].sum())
        if not total > 0:
            raise ValueError(f"round {number}: the islands' token weights sum to {total}")
        longest = int(table[:, 0].max())
        key = self._key(number, Phase.OUTER_GATHER, 1)
        rows = result(coll.all_gather(key, torch.nn.functional.pad(flat, (0, longest -
                                                                          flat.numel()))),
                      key=key, rank=coll.rank, timeout=self.timeout).view(coll.world_size,
                                                                          longest)
        states = [self._unflatten(rows[g], full, names, rank=int(table[g, 1]))
                  for g in range(coll.world_size)]
        ranks = [int(r) for r in table[:, 1]]
        scales = [float(a) / r for a, r in zip(table[:, 2], ranks)]
        merged = merge_adapter_states(states, scales=scales, weights=table[:, 3].tolist(),
                                      ranks_out=ranks, scales_out=scales)[coll.rank]
        self._keep(merged)
        log.info("round %d: merged LoRA adapters of ranks %s (weights %s) into rank %d",
                 number, ranks, table[:, 3].tolist(), self.lora.rank)
        return total

    @staticmethod
    def _unflatten(row: torch.Tensor, ours: dict[str, torch.Tensor], names: list[str], *,
                   rank: int) -> dict[str, torch.Tensor]:
        """An island's adapters from its flat row: our shapes, with its rank in place of ours."""
        out, offset = {}, 0
        for name in names:
            shape = list(ours[name].shape)
            if ".lora_A" in name or "lora_embedding_A" in name:
                shape[0] = rank
            elif ".lora_B" in name or "lora_embedding_B" in name:
                shape[1] = rank
            n = int(torch.Size(shape).numel())
            out[name] = row[offset:offset + n].view(shape)
            offset += n
        return out

    def _keep(self, merged: dict[str, torch.Tensor]) -> None:
        """This rank's owned slices (and the replicated masters) of the merged adapters."""
        engine = self.engine
        rank = engine.collectives.rank
        with torch.no_grad():
            for unit in engine.units:
                if not unit.trains:
                    continue
                a, b = owned_range(unit.trainable_shard, rank)
                unit.master.copy_(region_slice(unit.layout, merged, trainable=True, start=a,
                                               stop=b, dtype=torch.float32))
            for (name, _), master in zip(engine.replicated.trainable, engine.replicated.masters):
                master.copy_(merged[name])
        engine.replicated.refresh()
