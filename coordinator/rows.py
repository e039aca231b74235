"""The store's rows as Python values: workers, generations and members, outer rounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.fields import DEFAULT_SITE


@dataclass(slots=True)
class WorkerRow:
    """One worker as stored."""

    worker_id: str
    ip_address: str
    port: int
    device: str | None
    info: dict[str, Any]
    status: str
    registered_at: float
    last_heartbeat: float
    phase: str | None = None
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    site: str = DEFAULT_SITE
    outer_port: int | None = None


@dataclass(slots=True)
class Member:
    """A worker frozen into a generation, with the addresses it had then."""

    worker_id: str
    ip_address: str
    port: int
    rank: int
    outer_port: int | None = None


@dataclass(slots=True)
class GenerationRow:
    """A numbered membership of one site; ``members`` are ordered by rank."""

    generation: int
    created_at: float
    members: list[Member] = field(default_factory=list)
    site: str = DEFAULT_SITE

    def has(self, worker_id: str) -> bool:
        return any(m.worker_id == worker_id for m in self.members)


@dataclass(frozen=True, slots=True)
class IslandRow:
    """A site as counted in an outer round: the generation it came with, and whether it joins
    (takes the others' state rather than contributing its own)."""

    site: str
    generation: int
    joining: bool


@dataclass(slots=True)
class RoundRow:
    """A decided outer round; ``islands`` are ordered by site."""

    round: int
    decided_at: float
    islands: list[IslandRow]
