"""SQLite state: workers, generations with their members, and the telemetry ring.

One connection guarded by a lock; every statement is short, so it runs on the event loop.
Times are wall-clock seconds so they stay meaningful across a coordinator restart.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
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
    phase TEXT, step INTEGER, loss REAL, tokens_per_s REAL
);
CREATE TABLE IF NOT EXISTS generations (
    generation INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    ended_at REAL,                     -- NULL while the generation is active
    end_reason TEXT
);
CREATE TABLE IF NOT EXISTS members (
    generation INTEGER NOT NULL REFERENCES generations(generation),
    rank INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    ip_address TEXT NOT NULL,
    port INTEGER NOT NULL,
    PRIMARY KEY (generation, rank)
);
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_id TEXT NOT NULL,
    ts REAL NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_by_worker ON telemetry (worker_id, id);
"""

WORKER_COLUMNS = ("worker_id, ip_address, port, device, info, status, registered_at, "
                  "last_heartbeat, phase, step, loss, tokens_per_s")


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


@dataclass(slots=True)
class Member:
    """A worker frozen into a generation, with the address it had then."""

    worker_id: str
    ip_address: str
    port: int
    rank: int


@dataclass(slots=True)
class GenerationRow:
    """A numbered membership; ``members`` are ordered by rank."""

    generation: int
    created_at: float
    members: list[Member] = field(default_factory=list)

    def has(self, worker_id: str) -> bool:
        return any(m.worker_id == worker_id for m in self.members)


def _worker(row: tuple) -> WorkerRow:
    values = list(row)
    values[4] = json.loads(values[4])
    return WorkerRow(*values)


class Store:
    """The coordinator's durable state; ``path`` may be ``:memory:``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: list[tuple[str, tuple]]) -> list[int]:
        """Run statements in one transaction, all or nothing; their row counts."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                counts = [self._db.execute(sql, args).rowcount for sql, args in statements]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return counts

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- workers -------------------------------------------------------------------------------

    def upsert_worker(self, worker_id: str, *, ip_address: str, port: int, device: str | None,
                      info: dict[str, Any], now: float) -> None:
        """Insert a new worker, or revive a known one at its (possibly new) address."""
        self._tx([("""
            INSERT INTO workers (worker_id, seq, ip_address, port, device, info, status,
                                 registered_at, last_heartbeat)
            VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM workers), ?, ?, ?, ?, 'alive', ?, ?)
            ON CONFLICT (worker_id) DO UPDATE SET
                ip_address = excluded.ip_address, port = excluded.port, device = excluded.device,
                info = excluded.info, status = 'alive', registered_at = excluded.registered_at,
                last_heartbeat = excluded.last_heartbeat,
                phase = NULL, step = NULL, loss = NULL, tokens_per_s = NULL
            """, (worker_id, ip_address, port, device, json.dumps(info), now, now))])

    def worker(self, worker_id: str) -> WorkerRow | None:
        rows = self._all(f"SELECT {WORKER_COLUMNS} FROM workers WHERE worker_id = ?", (worker_id,))
        return _worker(rows[0]) if rows else None

    def workers(self, status: str | None = None) -> list[WorkerRow]:
        """Workers in registration order, optionally only those with ``status``."""
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._all(f"SELECT {WORKER_COLUMNS} FROM workers {where} ORDER BY seq", args)
        return [_worker(r) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(("alive", "dead", "left"), 0)
        counts.update(self._all("SELECT status, COUNT(*) FROM workers GROUP BY status"))
        return counts

    def heartbeat(self, worker_id: str, *, now: float, status: dict[str, Any]) -> bool:
        """Record a heartbeat of an alive worker in one statement; status fields that are
        absent keep their last value. False (nothing written) if no alive worker has the id."""
        return self._tx([("""
            UPDATE workers SET last_heartbeat = ?, phase = COALESCE(?, phase),
                step = COALESCE(?, step), loss = COALESCE(?, loss),
                tokens_per_s = COALESCE(?, tokens_per_s)
            WHERE worker_id = ? AND status = 'alive'""",
            (now, status.get("phase"), status.get("step"), status.get("loss"),
             status.get("tokens_per_s"), worker_id))]) == [1]

    def set_status(self, worker_id: str, status: str) -> None:
        self._tx([("UPDATE workers SET status = ? WHERE worker_id = ?", (status, worker_id))])

    def expired(self, deadline: float) -> list[str]:
        """Alive workers whose last heartbeat is older than ``deadline``."""
        rows = self._all("SELECT worker_id FROM workers WHERE status = 'alive' "
                         "AND last_heartbeat < ? ORDER BY seq", (deadline,))
        return [r[0] for r in rows]

    def oldest_heartbeat(self) -> float | None:
        """The oldest last heartbeat among alive workers: the next one to expire."""
        return self._all("SELECT MIN(last_heartbeat) FROM workers WHERE status = 'alive'")[0][0]

    def refresh_alive(self, now: float) -> int:
        """Give every alive worker a fresh heartbeat (after a coordinator restart)."""
        with self._lock:
            return self._db.execute("UPDATE workers SET last_heartbeat = ? "
                                    "WHERE status = 'alive'", (now,)).rowcount

    # -- generations ---------------------------------------------------------------------------

    def current_generation(self) -> GenerationRow | None:
        """The active generation, if any (at most one is active at a time)."""
        rows = self._all("SELECT generation, created_at FROM generations "
                         "WHERE ended_at IS NULL ORDER BY generation DESC LIMIT 1")
        if not rows:
            return None
        gen = GenerationRow(*rows[0])
        gen.members = [Member(*r) for r in self._all(
            "SELECT worker_id, ip_address, port, rank FROM members "
            "WHERE generation = ? ORDER BY rank", (gen.generation,))]
        return gen

    def last_generation(self) -> int:
        """The highest generation number ever created (0 if none)."""
        return self._all("SELECT COALESCE(MAX(generation), 0) FROM generations")[0][0]

    def create_generation(self, workers: list[WorkerRow], *, now: float,
                          at_least: int = 1) -> GenerationRow:
        """Freeze ``workers`` (in order: their ranks) into the next numbered generation,
        numbered ``at_least`` or more."""
        number = max(self.last_generation() + 1, at_least)
        members = [Member(w.worker_id, w.ip_address, w.port, rank)
                   for rank, w in enumerate(workers)]
        self._tx([("INSERT INTO generations (generation, created_at) VALUES (?, ?)",
                   (number, now))] +
                 [("INSERT INTO members (generation, rank, worker_id, ip_address, port) "
                   "VALUES (?, ?, ?, ?, ?)", (number, m.rank, m.worker_id, m.ip_address, m.port))
                  for m in members])
        return GenerationRow(number, now, members)

    def end_generation(self, generation: int, *, reason: str, now: float) -> None:
        self._tx([("UPDATE generations SET ended_at = ?, end_reason = ? "
                   "WHERE generation = ? AND ended_at IS NULL", (now, reason, generation))])

    # -- telemetry -----------------------------------------------------------------------------

    def add_telemetry(self, worker_id: str, *, ts: float, metrics: dict[str, Any],
                      keep: int) -> bool:
        """In one transaction: move a known worker's step/loss/throughput columns (liveness
        untouched), append the row, drop its rows beyond the newest ``keep``. False, with
        nothing written, if no worker has the id."""
        known, _, _ = self._tx([
            ("UPDATE workers SET step = COALESCE(?, step), loss = COALESCE(?, loss), "
             "tokens_per_s = COALESCE(?, tokens_per_s) WHERE worker_id = ?",
             (metrics.get("step"), metrics.get("loss"), metrics.get("tokens_per_s"), worker_id)),
            ("INSERT INTO telemetry (worker_id, ts, metrics) SELECT ?, ?, ? "
             "WHERE EXISTS (SELECT 1 FROM workers WHERE worker_id = ?)",
             (worker_id, ts, json.dumps(metrics), worker_id)),
            ("DELETE FROM telemetry WHERE worker_id = ? AND id <= (SELECT id FROM telemetry "
             "WHERE worker_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
             (worker_id, worker_id, keep)),
        ])
        return known == 1

    def telemetry(self, worker_id: str | None, limit: int) -> list[tuple[str, float, dict]]:
        """The newest ``limit`` rows (of one worker, or of all), oldest first."""
        where, args = ("WHERE worker_id = ?", (worker_id,)) if worker_id else ("", ())
        rows = self._all(f"SELECT worker_id, ts, metrics FROM telemetry {where} "
                         "ORDER BY id DESC LIMIT ?", (*args, limit))
        return [(w, ts, json.loads(m)) for w, ts, m in reversed(rows)]

