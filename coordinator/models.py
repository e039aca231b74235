"""Request and response schemas: the coordinator's HTTP contract, validated at the door.

The value types and their bounds are ``coordinator.fields``; error bodies are
``coordinator.responses``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StringConstraints,
    model_validator,
)

from coordinator.config import MAX_WAIT_S
from coordinator.fields import (
    DEFAULT_SITE,
    MAX_BANDWIDTH_MBPS,
    MAX_FIELDS,
    MAX_RAM_GB,
    MAX_WORKERS,
    NAME_PATTERN,
    CpuCores,
    ExtraNumber,
    ExtraScalar,
    GenerationNumber,
    Host,
    Metric,
    Port,
    Rate,
    ShortText,
    Site,
    Step,
    WorkerId,
    json_int,
)

# A PEM certificate signing request; the route checks its signature (422 naming csr if bad).
Csr = Annotated[str, StringConstraints(max_length=8192, pattern=(
    r"^-----BEGIN CERTIFICATE REQUEST-----\r?\n[A-Za-z0-9+/=\r\n]{1,8000}"
    r"-----END CERTIFICATE REQUEST-----\r?\n?$"))]

WorkerStatus = Literal["alive", "dead", "left"]
Scalar = str | int | float | bool | None
_NAME = re.compile(NAME_PATTERN)
# Published with each body that takes extra fields: how many, and how they may be named.
_EXTRAS_SCHEMA = {"maxProperties": MAX_FIELDS, "propertyNames": {"pattern": NAME_PATTERN}}


def _check_extras(model: BaseModel) -> None:
    """Extra fields must be few and plainly named (their values are typed by
    ``__pydantic_extra__``)."""
    extra = model.model_extra or {}
    count = len(model.model_fields_set | set(extra))
    if count > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} fields, got {count}")
    for name in extra:
        if not _NAME.fullmatch(name):
            raise ValueError(f"field name {name[:64]!r} is not a short plain-text name")


class RegisterRequest(BaseModel):
    """A worker announcing itself: its id, the address of its gRPC server, its capacity, its
    site (island) and, for the outer rounds across sites, its second gRPC server's port."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_EXTRAS_SCHEMA)
    __pydantic_extra__: dict[str, ExtraScalar] = Field(init=False)

    worker_id: WorkerId
    ip_address: Host
    port: Port
    device: ShortText | None = None
    gpu_info: ShortText | None = None
    gpu_name: ShortText | None = None
    cpu_cores: CpuCores | None = None
    ram_gb: Rate = Field(default=None, le=MAX_RAM_GB)
    bandwidth_mbps: Rate = Field(default=None, le=MAX_BANDWIDTH_MBPS)
    site: Site = DEFAULT_SITE
    outer_port: Port | None = None
    csr: Csr | None = None  # TLS mode: a certificate is signed for worker_id over its key

    @model_validator(mode="after")
    def _extras(self) -> RegisterRequest:
        _check_extras(self)
        return self


class HeartbeatRequest(BaseModel):
    """A heartbeat, optionally with the worker's latest status."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_EXTRAS_SCHEMA)
    __pydantic_extra__: dict[str, ExtraScalar] = Field(init=False)

    phase: ShortText | None = None
    step: Step | None = None
    loss: Metric = None
    tokens_per_s: Rate = None

    @model_validator(mode="after")
    def _extras(self) -> HeartbeatRequest:
        _check_extras(self)
        return self


class TelemetryRequest(BaseModel):
    """One step's metrics from one worker: its id plus any numeric fields."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_EXTRAS_SCHEMA)
    __pydantic_extra__: dict[str, ExtraNumber] = Field(init=False)

    worker_id: WorkerId
    step: Step | None = None  # it moves the worker's step column, an SQLite INTEGER

    @model_validator(mode="after")
    def _extras(self) -> TelemetryRequest:
        _check_extras(self)
        return self

    def metrics(self) -> dict[str, float | int | None]:
        """The numeric fields (NaN/inf already turned into None)."""
        step = {} if self.step is None else {"step": self.step}
        return {**step, **(self.model_extra or {})}


class WorkerOut(BaseModel):
    """One row of ``GET /workers``, read straight off the store's WorkerRow."""

    model_config = ConfigDict(from_attributes=True)

    worker_id: str
    ip_address: str
    port: int
    device: str | None
    status: WorkerStatus
    registered_at: float
    last_heartbeat: float
    phase: str | None = None
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    info: dict[str, Scalar] = {}
    site: str = DEFAULT_SITE
    outer_port: int | None = None


class PeerOut(BaseModel):
    """A worker as the barrier reports it; ``rank`` is None until it is in a generation."""

    model_config = ConfigDict(from_attributes=True)

    worker_id: str
    ip_address: str
    port: int
    rank: int | None


class ReadyResponse(BaseModel):
    """The barrier's answer; ``workers`` are the generation's members when ``ready``."""

    ready: bool
    active_workers: int
    min_workers: int
    generation: int | None
    workers: list[PeerOut]


class GenerationOut(BaseModel):
    """``GET /training/generation``: the site's active generation (None when none is), the
    highest number ever given in any site, and the active one's members."""

    generation: int | None
    last_generation: int
    workers: list[PeerOut]
    site: str = DEFAULT_SITE


Seconds = Annotated[StrictFloat, Field(ge=0, le=MAX_WAIT_S, allow_inf_nan=False)]


class RoundRequest(BaseModel):
    """A member of its site's active generation arriving at an outer round (see
    ``coordinator.islands``): how many islands it expects, how long to wait for them, and how
    long to hold this request (long-poll)."""

    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId
    site: Site = DEFAULT_SITE
    generation: GenerationNumber
    joining: StrictBool = False
    islands: json_int(1, MAX_WORKERS)
    quorum_timeout: Seconds
    wait: Seconds = 0.0


class IslandMember(BaseModel):
    """A member of an island as an outer round reports it; ``port`` is its outer port."""

    model_config = ConfigDict(from_attributes=True)

    worker_id: str
    ip_address: str
    port: int
    rank: int


class IslandOut(BaseModel):
    """One island in an outer round: its generation as frozen, with its members by rank."""

    site: str
    generation: int
    joining: bool
    members: list[IslandMember]


class RoundResponse(BaseModel):
    """``POST /islands/rounds/{round}``: the islands of the decided round, by site; while
    ``decided`` is false, those that have arrived so far (post again)."""

    round: int
    decided: bool
    islands: list[IslandOut]


class IslandSummary(BaseModel):
    """An island of a decided round, without its members."""

    model_config = ConfigDict(from_attributes=True)

    site: str
    generation: int
    joining: bool


class DecidedRound(BaseModel):
    """One row of ``GET /islands/rounds``."""

    model_config = ConfigDict(from_attributes=True)

    round: int
    decided_at: float
    islands: list[IslandSummary]


class TelemetryRow(BaseModel):
    """One stored telemetry row."""

    worker_id: str
    ts: float
    metrics: dict[str, float | int | None]


class Health(BaseModel):
    """``GET /healthz``."""

    ok: bool


class Message(BaseModel):
    """A plain acknowledgement with a human-readable message."""

    ok: bool = True
    message: str


class Registered(Message):
    """``POST /workers/register``; in TLS mode a new id's ``credential`` (shown once: it acts
    for this id from now on, coordinator/roles.py) and, for a ``csr``, the signed
    ``certificate`` (PEM) with its end (``not_after``, epoch seconds)."""

    credential: str | None = None
    certificate: str | None = None
    not_after: float | None = None


class CertificateRequest(BaseModel):
    """``POST /workers/{worker_id}/certificate``: renew the worker's certificate."""

    model_config = ConfigDict(extra="forbid")

    csr: Csr


class CertificateOut(BaseModel):
    """A signed worker certificate (PEM) and its end (epoch seconds)."""

    certificate: str
    not_after: float
