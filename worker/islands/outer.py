"""The outer (DiLoCo) step of one rank: a global copy of its owned slices, an outer optimizer,
and the exchange with the ranks of other islands that own the same elements.

[Note: outer rounds]
Every ``outer_every`` inner steps, round k: each rank asks the coordinator which islands are
in round k (the quorum: those that arrived, or all of them), then, with the rank of the same
number in every island of the quorum (its counterparts: equal island sizes slice every unit
alike), it averages the pseudo-gradient ``global - local`` of its owned slices (weighted by
tokens for private data, else equally), steps the outer optimizer on the global copy (SGD with
Nesterov momentum, lr 0.7, as DiLoCo) and restarts the inner weights from it; the inner
optimizer's state is kept. The sum is a reduce-scatter (the outer codec, error feedback) and an
all-gather of the summed parts in the same codec, which hands every island the same decoded
rows (its own included), so every island ends with bit-identical global weights.

An island that (re)formed after round R was decided joins at round R+1 without inner steps:
it contributes nothing and receives the global copy and momentum of the first contributor
(OUTER_STATE), then trains from there. The exchange runs on a second gRPC transport whose
"generation" is the round, so nothing from an older round is ever mixed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from communication.collectives import Key, Phase, result
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.islands.config import IslandConfig

log = logging.getLogger(__name__)


class RoundSource(Protocol):
    """Who decides an outer round's quorum: the coordinator, through ``Membership``."""

    def outer_round(self, round: int, *, site: str, generation: int, joining: bool,
                    islands: int, quorum_timeout: float, timeout: float) -> Any: ...

    def last_round(self) -> int: ...


@dataclass(slots=True)
class RoundRecord:
    """One outer round as this rank saw it."""

    round: int
    sites: list[str]  # the quorum, in group-rank order
    contributors: list[str]
    joined: bool  # this island joined in this round (received the global copy)
    seconds: float
    bytes_sent: int
    weight: float  # this island's weight in the average
    total_weight: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class OuterSync:
    """The global copy and outer optimizer of one rank's owned slices; see the module note."""

    config: IslandConfig
    params: Sequence[nn.Parameter]  # the engine's masters, stepped by the inner optimizer
    transport: GrpcTransport
    source: RoundSource
    generation: int  # this island's (inner) generation, which the coordinator checks
    rank: int  # rank inside the island
    world_size: int  # island size
    timeout: float
    refresh: Any = None  # called after the masters change (replicated parameters' copies)
    federated: Any = None  # a FederatedMerge when LoRA ranks may differ between islands
    round: int = 0  # outer rounds applied to ``globals``
    joining: bool = False
    history: list[RoundRecord] = field(default_factory=list)
    globals: list[nn.Parameter] = field(init=False)
    optimizer: torch.optim.SGD = field(init=False)
    _index: dict[int, int] = field(init=False)  # id(param) -> its place in ``globals``
    residual: torch.Tensor | None = field(init=False, default=None)  # the reduce-scatter's
    gather_residual: torch.Tensor | None = field(init=False, default=None)  # the all-gather's

    def __post_init__(self) -> None:
        cfg = self.config
        self.globals = [nn.Parameter(p.detach().clone(), requires_grad=True) for p in self.params]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.optimizer = torch.optim.SGD(self.globals, lr=cfg.outer_lr,
                                         momentum=cfg.outer_momentum,
                                         nesterov=cfg.outer_nesterov and cfg.outer_momentum > 0,
                                         foreach=False)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def state_of(self, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The global copy and outer momentum kept for one of ``params`` (None if not one)."""
        i = self._index.get(id(master))
        if i is None:
            return None
        g = self.globals[i]
        return g, self.optimizer.state.get(g, {}).get("momentum_buffer")

    def due(self, step: int) -> bool:
        """Whether the inner step count ``step`` ends a round."""
        return step > 0 and step % self.config.outer_every == 0

    def rejoin_if_behind(self, agree) -> None:
        """At a generation's start: if the coordinator decided rounds past ours, join the next
        one. ``agree(value)`` returns the island's maximum (every rank must see the same R)."""
        latest = int(agree(self.source.last_round()))
        if latest > self.round:
            log.info("rank %d: island is at outer round %d, the others at %d: joining round %d",
                     self.rank, self.round, latest, latest + 1)
            self.round, self.joining = latest, True

    def sync(self, *, weight: float) -> RoundRecord:
        """Run round ``self.round + 1``: quorum, average, outer step, inner weights restarted
        (or, for a joining island, the global copy received). Returns what happened."""
        cfg, number, t0 = self.config, self.round + 1, time.perf_counter()
        info = self.source.outer_round(number, site=cfg.site, generation=self.generation,
                                       joining=self.joining, islands=cfg.count,
                                       quorum_timeout=cfg.quorum_timeout, timeout=self.timeout
                                       + cfg.quorum_timeout)
        sites = [i.site for i in info.islands]
        if info.island(cfg.site, self.generation) is None:  # decided without this generation
            log.warning("rank %d: round %d was decided without site %s (quorum %s); joining "
                        "round %d", self.rank, number, cfg.site, sites, number + 1)
            self.round, self.joining = number, True
            return self._record(number, sites, [], joined=False, t0=t0, sent=0, weight=0.0,
                                total=0.0)
        contributors = [i.site for i in info.islands if not i.joining]
        if not contributors:  # nobody holds a newer global copy: go on from our own
            log.warning("rank %d: round %d has no contributing island; keeping this island's "
                        "weights", self.rank, number)
            self.round, self.joining = number, False
            return self._record(number, sites, [], joined=False, t0=t0, sent=0, weight=0.0,
                                total=0.0)
        coll = self._bind(info, number)
        joined, mine = self.joining, 0.0 if self.joining else weight
        try:
            if self.federated is not None and self.federated.ranks_differ(coll, number):
                total = self.federated.merge(coll, number, mine)  # writes the masters
                with torch.no_grad():
                    for p, g in zip(self.params, self.globals):
                        g.copy_(p)
            else:
                total = self._average(coll, number, mine)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if any(i.joining for i in info.islands):
                    self._share_state(coll, number, donor=sites.index(contributors[0]))
                with torch.no_grad():
                    for p, g in zip(self.params, self.globals):
                        p.copy_(g)
                if self.refresh is not None:
                    self.refresh()
            sent = sum(coll.bytes_sent.values())
        finally:
            coll.close()
        self.round, self.joining = number, False
        return self._record(number, sites, contributors, joined=joined, t0=t0, sent=sent,
                            weight=mine, total=total)

    # --- machinery --------------------------------------------------------------------------

    def _bind(self, info, number: int) -> GrpcCollectives:
        sizes = {i.site: len(i.members) for i in info.islands}
        if len(set(sizes.values())) != 1 or self.world_size not in sizes.values():
            raise ValueError(f"round {number}: islands must have equal sizes (counterparts own "
                             f"the same elements); sizes {sizes}, this island "
                             f"{self.config.site} {self.world_size}")
        peers = [f"{i.members[self.rank].ip_address}:{i.members[self.rank].port}"
                 for i in info.islands]
        group_rank = [i.site for i in info.islands].index(self.config.site)
        members = [i.members[self.rank].worker_id for i in info.islands]  # the mTLS identities
        return GrpcCollectives.bind(self.transport, rank=group_rank, world_size=len(peers),
                                    peers=peers, generation=number, timeout=self.timeout,
                                    codec=self.config.outer_codec, members=members)

    def _key(self, number: int, phase: Phase) -> Key:
        return Key(generation=number, phase=phase, step=number, index=self.rank)

    def _wait(self, coll: GrpcCollectives, fut, key: Key):
        return result(fut, key=key, rank=coll.rank, timeout=self.timeout + 5.0)

    def _sum(self, coll: GrpcCollectives, number: int, flat: torch.Tensor, *,
             feedback: torch.Tensor | None) -> torch.Tensor:
        """Rank-order sum over the group of ``flat`` (padded to the group size): a
        reduce-scatter in the outer codec, then an all-gather of the summed parts (same
        codec: every island decodes the same rows)."""
        w, n = coll.world_size, flat.numel()
        padded = torch.nn.functional.pad(flat, (0, -n % w))
        key = self._key(number, Phase.OUTER_REDUCE)
        part = self._wait(coll, coll.reduce_scatter(key, padded, feedback=feedback), key)
        if feedback is not None:  # what the all-gather's codec loses goes with the next round
            if self.gather_residual is None or self.gather_residual.shape != part.shape:
                self.gather_residual = torch.zeros_like(part)
            part = part + self.gather_residual
        key = self._key(number, Phase.OUTER_GATHER)
        gathered = self._wait(coll, coll.all_gather(key, part), key)
        if feedback is not None:
            s = part.numel()
            self.gather_residual = part - gathered[coll.rank * s:(coll.rank + 1) * s]
        return gathered[:n]

    def _average(self, coll: GrpcCollectives, number: int, weight: float) -> float:
        """Weighted mean of the islands' pseudo-gradients into the globals' ``.grad``."""
        key = self._key(number, Phase.OUTER_WEIGHT)
        total = float(self._wait(coll, coll.all_reduce(key, torch.tensor([weight],
                                                                         dtype=torch.float64)),
                                 key)[0])
        if not total > 0:
            raise ValueError(f"round {number}: the islands' weights sum to {total}; every "
                             "contributing island must have trained on some tokens")
        with torch.no_grad():
            pseudo = torch.cat([(g - p).reshape(-1).cpu() for g, p in zip(self.globals,
                                                                          self.params)])
            if weight != 1.0:
                pseudo.mul_(weight)
        feedback = self._feedback(pseudo.numel(), coll.world_size)
        summed = self._sum(coll, number, pseudo, feedback=feedback)
        mean = summed / total if total != 1.0 else summed
        offset = 0
        for g in self.globals:
            g.grad = mean[offset:offset + g.numel()].view_as(g).to(g.device)
            offset += g.numel()
        return total

    def _feedback(self, n: int, world: int) -> torch.Tensor | None:
        """Error feedback of the outer codec (what the wire lost, sent with the next round)."""
        if self.config.outer_codec == "raw" or not self.config.outer_error_feedback:
            return None
        size = n + (-n % world)
        if self.residual is None or self.residual.numel() != size:
            self.residual = torch.zeros(size, dtype=torch.float32)
        return self.residual

    def _share_state(self, coll: GrpcCollectives, number: int, *, donor: int) -> None:
        """The donor's global copy and momentum to every island (joiners take them; the others
        hold the same values already): a sum in which only the donor's part is nonzero."""
        buffers = [self.optimizer.state.get(g, {}).get("momentum_buffer") for g in self.globals]
        with_momentum = self.config.outer_momentum > 0
        parts = [g.detach().reshape(-1).cpu() for g in self.globals]
        if with_momentum:
            parts += [(b if b is not None else torch.zeros_like(g)).reshape(-1).cpu()
                      for b, g in zip(buffers, self.globals)]
        flat = torch.cat(parts)
        if coll.rank != donor:
            flat = torch.zeros_like(flat)
        state = self._sum_raw(coll, number, flat)
        offset = 0
        with torch.no_grad():
            for g in self.globals:
                g.copy_(state[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if with_momentum:
                for g in self.globals:
                    buf = state[offset:offset + g.numel()].view_as(g).to(g.device).clone()
                    self.optimizer.state.setdefault(g, {})["momentum_buffer"] = buf
                    offset += g.numel()

    def _sum_raw(self, coll: GrpcCollectives, number: int, flat: torch.Tensor) -> torch.Tensor:
        w, n = coll.world_size, flat.numel()
        padded = torch.nn.functional.pad(flat, (0, -n % w))
        key = self._key(number, Phase.OUTER_STATE)
        # an all-reduce is exact (never compressed), whatever the outer codec
        return self._wait(coll, coll.all_reduce(key, padded), key)[:n]

    def _record(self, number: int, sites: list[str], contributors: list[str], *, joined: bool,
                t0: float, sent: int, weight: float, total: float) -> RoundRecord:
        record = RoundRecord(round=number, sites=sites, contributors=contributors, joined=joined,
                             seconds=time.perf_counter() - t0, bytes_sent=sent, weight=weight,
                             total_weight=total)
        self.history.append(record)
        log.info("rank %d: outer round %d with %s (contributing %s) in %.2fs, %d bytes sent",
                 self.rank, number, sites, contributors, record.seconds, sent)
        return record
