"""Request and response schemas: the coordinator's HTTP contract, validated at the door."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# 1..128 characters, none of them a control character (no newlines smuggled into logs).
WORKER_ID_PATTERN = r"^[^\x00-\x1f\x7f]{1,128}$"
WorkerId = Annotated[str, StringConstraints(pattern=WORKER_ID_PATTERN, max_length=128)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Scalar = str | int | float | bool | None
MAX_EXTRA_FIELDS = 32

WorkerStatus = Literal["alive", "dead", "left"]


def _finite(value: Scalar) -> Scalar:
    """NaN and infinities become None: JSON cannot carry them and a NaN loss must not 500."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _check_extras(model: BaseModel, *, numeric: bool) -> None:
    """Extra fields must be few, short-named scalars (numbers only when ``numeric``)."""
    extra = model.model_extra or {}
    if len(extra) > MAX_EXTRA_FIELDS:
        raise ValueError(f"at most {MAX_EXTRA_FIELDS} extra fields, got {len(extra)}")
    for name, value in extra.items():
        if len(name) > 64 or not name.isprintable():
            raise ValueError(f"field name {name[:64]!r} is not a short printable name")
        if numeric:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"field {name!r} must be a number, got {type(value).__name__}")
        elif not isinstance(value, Scalar) or (isinstance(value, str) and len(value) > 256):
            raise ValueError(f"field {name!r} must be a number, boolean or short string")
        extra[name] = _finite(value)


class RegisterRequest(BaseModel):
    """A worker announcing itself: its id, the address of its gRPC server, its capacity."""

    model_config = ConfigDict(extra="allow")

    worker_id: WorkerId
    ip_address: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    port: int = Field(ge=1, le=65535)
    device: ShortText | None = None
    gpu_info: ShortText | None = None
    gpu_name: ShortText | None = None
    cpu_cores: int | None = Field(default=None, ge=0)
    ram_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    bandwidth_mbps: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _extras(self) -> RegisterRequest:
        _check_extras(self, numeric=False)
        return self


class HeartbeatRequest(BaseModel):
    """A heartbeat, optionally with the worker's latest status."""

    model_config = ConfigDict(extra="allow")

    phase: ShortText | None = None
    step: int | None = Field(default=None, ge=0)
    loss: float | None = None
    tokens_per_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _extras(self) -> HeartbeatRequest:
        _check_extras(self, numeric=False)
        self.loss = _finite(self.loss)
        self.tokens_per_s = _finite(self.tokens_per_s)
        return self


class TelemetryRequest(BaseModel):
    """One step's metrics from one worker: its id plus any numeric fields."""

    model_config = ConfigDict(extra="allow")

    worker_id: WorkerId

    @model_validator(mode="after")
    def _extras(self) -> TelemetryRequest:
        _check_extras(self, numeric=True)
        return self

    def metrics(self) -> dict[str, float | int | None]:
        """The numeric fields (NaN/inf already turned into None)."""
        return dict(self.model_extra or {})


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


class TelemetryRow(BaseModel):
    """One stored telemetry row."""

    worker_id: str
    ts: float
    metrics: dict[str, float | int | None]


class Message(BaseModel):
    """A plain acknowledgement with a human-readable message."""

    ok: bool = True
    message: str
