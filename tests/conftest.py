"""Shared fixtures: a real coordinator (uvicorn on port 0, SQLite in tmp_path) per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coordinator_helpers import TOKEN, serve  # noqa: E402

from coordinator.config import Settings  # noqa: E402


@pytest.fixture
def url(tmp_path):
    """A coordinator with a 30 s heartbeat timeout."""
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN, heartbeat_timeout=30.0)) as (u, _):
        yield u


@pytest.fixture
def fast_url(tmp_path):
    """A coordinator that declares a worker dead after 1 s of silence."""
    with serve(Settings(db=str(tmp_path / "c.db"), token=TOKEN, heartbeat_timeout=1.0)) as (u, _):
        yield u
