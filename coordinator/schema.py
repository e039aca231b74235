"""The SQLite schema, and the upgrade of files written by an older coordinator.

``CREATE TABLE IF NOT EXISTS`` leaves an old table as it was, so columns added since are
added here with ``ALTER TABLE`` when ``PRAGMA table_info`` lacks them: a coordinator
restarted on a file from before sites existed opens it, and its rows read as site
``default`` with no outer port. Indexes on added columns are created only after the upgrade.
"""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger(__name__)

TABLES = """
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,              -- first-registration order: ranks follow it
    ip_address TEXT NOT NULL,
    port INTEGER NOT NULL,
    device TEXT,
    info TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,              -- alive | dead | left
    registered_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    phase TEXT, step INTEGER, loss REAL, tokens_per_s REAL,
    site TEXT NOT NULL DEFAULT 'default',
    outer_port INTEGER,                -- the worker's second gRPC server (outer rounds)
    credential TEXT                    -- SHA-256 of its worker credential (TLS mode; roles.py)
);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,    -- unique across every site
    created_at REAL NOT NULL,
    ended_at REAL,                     -- NULL while the generation is active
    end_reason TEXT,
    site TEXT NOT NULL DEFAULT 'default'  -- at most one active generation per site
);
CREATE TABLE IF NOT EXISTS members (
    generation INTEGER NOT NULL REFERENCES generations(generation),
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    ip_address TEXT NOT NULL,
    port INTEGER NOT NULL,
    outer_port INTEGER,
    PRIMARY KEY (generation, rank)
);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    ts REAL NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_by_worker ON telemetry (worker_id, id);
CREATE TABLE IF NOT EXISTS rounds (    -- decided outer rounds only
    round INTEGER PRIMARY KEY,
    decided_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS round_islands (
    round INTEGER NOT NULL REFERENCES rounds(round),
    site TEXT NOT NULL,
    generation INTEGER NOT NULL,
    joining INTEGER NOT NULL,          -- 0 | 1
    PRIMARY KEY (round, site)
);
CREATE TABLE IF NOT EXISTS sessions (  -- the training service's sessions (coordinator/sessions.py)
    session_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,              -- its SessionRequest, JSON
    model TEXT,                        -- ModelInfo JSON once the workers built the model
    base_seq INTEGER,                  -- the newest clean saved state: replays start there
    base_path TEXT,
    noise_salt TEXT,                   -- seeds DP noise (with the seq): replays draw the same
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the order workers run operations in
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    seq INTEGER NOT NULL,              -- 0 creates the session; the client numbers the rest
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    digest TEXT NOT NULL,              -- SHA-256 of the body: a retry must match it
    status TEXT NOT NULL,              -- queued | running | done | failed | cancelled
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (session_id, seq)
);
"""

# Columns added after a table was first released: (table, column, declaration).
ADDED_COLUMNS = (
    ("workers", "site", "TEXT NOT NULL DEFAULT 'default'"),
    ("workers", "outer_port", "INTEGER"),
    ("generations", "site", "TEXT NOT NULL DEFAULT 'default'"),
    ("members", "outer_port", "INTEGER"),
    ("workers", "credential", "TEXT"),
)

INDEXES = """
CREATE INDEX IF NOT EXISTS generations_active ON generations (site, ended_at);
CREATE UNIQUE INDEX IF NOT EXISTS workers_by_credential ON workers (credential);
"""


def ensure_schema(db: sqlite3.Connection) -> list[str]:
    """Create what is missing and add the columns an older file lacks; returns the
    ``table.column`` names it added."""
    db.executescript(TABLES)
    added = []
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            added.append(f"{table}.{column}")
    if added:
        log.info("upgraded the store's schema: added %s", ", ".join(added))
    db.executescript(INDEXES)
    return added
