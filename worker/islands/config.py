"""Islands: which site this worker trains in, and how the sites synchronise (DiLoCo).

Inside a site (an *island*) training is the ZeRO-3 engine as it is. Every ``outer_every``
inner steps each rank averages its owned slice's pseudo-gradient (global minus local weights)
with the ranks of the other islands that own the same elements, and an outer optimizer steps
the global copy (outer.py). One site for everyone is today's training, bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from communication.codec import CODECS

DEFAULT_SITE = "default"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True, kw_only=True)
class IslandConfig:
    """This worker's site and the outer loop's settings; validated naming the option."""

    site: str = DEFAULT_SITE
    sites: tuple[str, ...] = ()  # every island of the run, in data order (empty: one island)
    outer_every: int = 0  # H: inner steps between outer syncs
    outer_lr: float = 0.7  # DiLoCo's outer SGD
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    outer_codec: str = "raw"  # how pseudo-gradients travel between islands
    outer_error_feedback: bool = True  # with a lossy outer codec
    quorum_timeout: float = 30.0  # seconds an outer round waits for the islands still missing
    private_data: bool = False  # this site's --data is its own: split over the island only

    def __post_init__(self) -> None:
        for name in (self.site, *self.sites):
            if not SITE_NAME.fullmatch(name):
                raise ValueError(f"site name {name!r} is not 1-64 letters, digits, '.', '_' or "
                                 "'-' starting with a letter or digit")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites {list(self.sites)} name an island twice")
        if self.sites and self.site not in self.sites:
            raise ValueError(f"site {self.site!r} is not one of the sites {list(self.sites)}")
        if len(self.sites) > 1 and self.outer_every < 1:
            raise ValueError(f"{len(self.sites)} sites need outer_every >= 1 (inner steps "
                             f"between outer syncs), got {self.outer_every}")
        if self.outer_every < 0:
            raise ValueError(f"outer_every must be >= 0, got {self.outer_every}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.outer_codec not in CODECS:
            raise ValueError(f"outer_codec {self.outer_codec!r} is not one of {sorted(CODECS)}")
        if not self.quorum_timeout >= 0:
            raise ValueError(f"quorum_timeout must be >= 0, got {self.quorum_timeout}")

    @property
    def count(self) -> int:
        """Islands in the run (1 without ``sites``)."""
        return max(len(self.sites), 1)

    @property
    def enabled(self) -> bool:
        """Whether there is an outer loop at all (more than one island)."""
        return self.count > 1

    @property
    def index(self) -> int:
        """This site's place among the sites: which share of a shared corpus it reads."""
        return self.sites.index(self.site) if self.sites else 0
