"""What membership hands a worker: its generation and peers, and the outer rounds' islands.

Plain frozen values, built by the client from the coordinator's answers; nothing here talks
HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SITE = "default"  # the site of a worker that names none (the coordinator's too)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A member of a generation: where its gRPC server listens, and its rank."""

    worker_id: str
    ip_address: str
    port: int
    rank: int


@dataclass(frozen=True, slots=True)
class Generation:
    """A frozen membership of one site as one worker sees it; ``peers`` are ordered by rank."""

    generation: int
    rank: int
    world_size: int
    peers: list[PeerInfo]
    site: str = DEFAULT_SITE


@dataclass(frozen=True, slots=True)
class IslandInfo:
    """An island in an outer round: its site, the generation it came with, whether it joins
    (takes the others' state), and its members by rank at their *outer* ports."""

    site: str
    generation: int
    joining: bool
    members: list[PeerInfo]


@dataclass(frozen=True, slots=True)
class RoundInfo:
    """A decided outer round: its islands, ordered by site."""

    round: int
    islands: list[IslandInfo]

    def island(self, site: str, generation: int | None = None) -> IslandInfo | None:
        """``site``'s island, or None if the round was decided without it (or, given
        ``generation``, with another generation of the site: one that has since ended)."""
        return next((i for i in self.islands if i.site == site
                     and generation in (None, i.generation)), None)
