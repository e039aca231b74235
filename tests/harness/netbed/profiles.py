"""Link profiles: the bandwidth and round-trip time a test bed gives every connection.

A profile is what a link should measure; the bed builds it (``namespaces`` shapes the
bandwidth, ``proxy`` adds the delay) and the self-check holds the measurement to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """One link: ``bandwidth_mbit`` per direction of every access link (None: unshaped) and
    ``rtt_ms`` added to every round trip (0: no delay proxy)."""

    name: str
    bandwidth_mbit: float | None = None
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_mbit is not None and not 0.1 <= self.bandwidth_mbit <= 10_000:
            raise ValueError(f"profile {self.name!r}: bandwidth {self.bandwidth_mbit} Mbit/s is "
                             "outside 0.1..10000")
        if not 0 <= self.rtt_ms <= 10_000:
            raise ValueError(f"profile {self.name!r}: rtt {self.rtt_ms} ms is outside 0..10000")

    @property
    def shaped(self) -> bool:
        """Whether anything is added: then the bed needs network namespaces (root)."""
        return self.bandwidth_mbit is not None or self.rtt_ms > 0

    @property
    def one_way_delay_s(self) -> float:
        """What each proxy holds a byte for, per direction: half the round trip."""
        return self.rtt_ms / 2000.0

    def describe(self) -> str:
        bw = "unshaped" if self.bandwidth_mbit is None else f"{self.bandwidth_mbit:g} Mbit/s"
        return f"{self.name} ({bw}, {self.rtt_ms:g} ms RTT)"


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile(name="lan"),  # nothing added: loopback, no proxy, no shaping
    Profile(name="wan-1g", bandwidth_mbit=1000, rtt_ms=50),
    Profile(name="wan-100m", bandwidth_mbit=100, rtt_ms=50),
    Profile(name="edge", bandwidth_mbit=20, rtt_ms=80),
)}


def resolve(name: str | None = None, *, bandwidth_mbit: float | None = None,
            rtt_ms: float | None = None) -> Profile:
    """A named profile, or a custom one from ``bandwidth_mbit``/``rtt_ms`` (which also override
    a named profile's values). KeyError naming the known profiles for an unknown name."""
    if name is not None and name not in PROFILES:
        raise KeyError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)}")
    base = PROFILES[name] if name is not None else Profile(name="custom")
    if bandwidth_mbit is None and rtt_ms is None:
        return base
    bw = bandwidth_mbit if bandwidth_mbit is not None else base.bandwidth_mbit
    rtt = rtt_ms if rtt_ms is not None else base.rtt_ms
    label = f"custom-{bw:g}m-{rtt:g}ms" if bw is not None else f"custom-{rtt:g}ms"
    return Profile(name=label, bandwidth_mbit=bw, rtt_ms=rtt)
