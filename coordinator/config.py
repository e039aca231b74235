"""Coordinator settings: one slotted object, filled from arguments or ZEROP2P_* variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_BODY_BYTES = 64 * 1024  # larger request bodies are refused with 413
MAX_SERVICE_BODY_BYTES = 16 * 2**20  # /service/ bodies carry batches of token ids
MAX_WAIT_S = 60.0  # the longest a /training/ready long-poll may hold a request
TELEMETRY_ROWS_PER_WORKER = 1000  # the telemetry ring keeps this many recent rows per worker
CERT_LIFETIME_S = 86400.0  # a worker certificate's life; workers renew at two thirds of it


class Settings(BaseSettings):
    """What one coordinator needs; ``ZEROP2P_TOKEN`` etc. fill fields not given explicitly."""

    model_config = SettingsConfigDict(env_prefix="ZEROP2P_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    db: str = "zerop2p.db"
    token: str | None = None
    heartbeat_timeout: float = Field(default=30.0, gt=0)
    # seconds of silence from a member's trainer, while others report, before it is stalled
    # (coordinator/progress.py); trainers report every second, so less than 1 would misfire
    stall_after: float = Field(default=30.0, ge=1.0)
    max_wait: float = Field(default=MAX_WAIT_S, gt=0, le=MAX_WAIT_S)  # a long-poll's cap (s)
    log_level: str = "info"
    # TLS (coordinator/tls.py): "auto" makes the CA and server certificate in tls_dir (default:
    # beside db) on first start; or all four of your own files. Either turns roles on (roles.py).
    tls: Literal["off", "auto"] = "off"
    tls_dir: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_ca_key: str | None = None
    tls_names: list[str] = []  # more host names or addresses for the server certificate
    admin_token: str | None = None
    cert_lifetime: float = Field(default=CERT_LIFETIME_S, ge=1, le=366 * 86400)  # worker certs


def setting_default(name: str):
    """A field's default, for command-line help: the defaults live in Settings alone."""
    return Settings.model_fields[name].default
