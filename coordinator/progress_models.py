"""Progress schemas: where each rank's trainer is and who is stuck (``coordinator.progress``),
and telemetry's per-peer link fields. Part of the HTTP contract, beside ``coordinator.models``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from coordinator.fields import (
    MAX_FIELDS,
    MAX_WORKERS,
    GenerationNumber,
    ShortText,
    Step,
    WorkerId,
    json_int,
)

Rank = json_int(0, MAX_WORKERS - 1)
MAX_ELAPSED_S = 1e9
Elapsed = Annotated[StrictFloat, Field(ge=0, le=MAX_ELAPSED_S, allow_inf_nan=False)]


class WaitingReport(BaseModel):
    """The oldest collective a rank waits for: its key (``str(Key)``), the key in words
    (``Key.describe()``), the ranks that have not sent to it (None: the transport cannot tell),
    and how long it has been in flight."""

    model_config = ConfigDict(extra="forbid")

    key: ShortText
    what: ShortText
    missing: list[Rank] | None = Field(default=None, max_length=MAX_WORKERS)
    seconds: Elapsed


class ProgressRequest(BaseModel):
    """``POST /training/progress``: where a member's training thread is (the activity that
    began last, its step, unit and micro-batch; ``idle_s`` since that changed) and what it
    waits for. Sent by the trainer itself, so a hung trainer falls silent."""

    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId
    generation: GenerationNumber
    rank: Rank
    activity: ShortText | None = None
    step: Step | None = None
    unit: Step | None = None
    micro_batch: Step | None = None
    idle_s: Elapsed = 0.0
    waiting: WaitingReport | None = None


class RankStatus(BaseModel):
    """One member in ``GET /training/status``; ``silent_s`` is None while it never reported,
    and ``waiting.seconds`` is counted up to now."""

    rank: int
    worker_id: str
    address: str
    stalled: bool
    silent_s: float | None
    idle_s: float | None = None
    activity: str | None = None
    step: int | None = None
    unit: int | None = None
    micro_batch: int | None = None
    waiting: WaitingReport | None = None


class StalledRank(BaseModel):
    """A member silent for ``stall_after`` seconds while others reported: the collective it
    owes (the longest one waited for on it, None if no rank waits on it yet) and who waits."""

    rank: int
    worker_id: str
    address: str
    silent_s: float
    owes: WaitingReport | None
    waiting_ranks: list[int]


class StatusResponse(BaseModel):
    """``GET /training/status``: the site's active generation rank by rank, the stalled ones,
    and one sentence saying who is stuck on what."""

    site: str
    generation: int | None
    stall_after: float
    ranks: list[RankStatus]
    stalled: list[StalledRank]
    sentence: str


# Telemetry's per-peer fields (worker/membership/client.py writes them, coordinator/metrics.py
# reads them): the round trip of a Ping to peer rank r in ms, and the send rate to it in MB/s.
PEER_FIELD = re.compile(r"^peer(\d+)_(rtt_ms|send_mb_s)$")


def peer_fields(links, *, used: int) -> dict[str, float]:
    """The telemetry fields of ``links`` (objects with ``rank``, ``rtt_s``,
    ``send_bytes_per_s``; a value not measured is left out), slowest peer first, as many as fit
    beside ``used`` fields in one body (MAX_FIELDS)."""
    out: dict[str, float] = {}
    for link in sorted(links, key=lambda k: -(k.rtt_s or 0.0)):
        one = {f"peer{link.rank}_rtt_ms": None if link.rtt_s is None else link.rtt_s * 1e3,
               f"peer{link.rank}_send_mb_s": None if link.send_bytes_per_s is None
               else link.send_bytes_per_s / 1e6}
        one = {k: round(v, 4) for k, v in one.items() if v is not None}
        if used + len(out) + len(one) > MAX_FIELDS:
            break
        out.update(one)
    return out
