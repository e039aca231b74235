"""SQLite state: workers, generations (one active per site) with their members, the telemetry
ring, and the decided outer rounds. The tables are ``coordinator.schema``'s.

One connection guarded by a lock; every statement is short, so it runs on the event loop.
Times are wall-clock seconds so they stay meaningful across a coordinator restart.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from typing import Any

from coordinator.fields import DEFAULT_SITE
from coordinator.rows import GenerationRow, IslandRow, Member, RoundRow, WorkerRow
from coordinator.schema import ensure_schema

log = logging.getLogger(__name__)

WORKER_COLUMNS = ("worker_id, ip_address, port, device, info, status, registered_at, "
                  "last_heartbeat, phase, step, loss, tokens_per_s, site, outer_port")
MEMBER_COLUMNS = "worker_id, ip_address, port, rank, outer_port"


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
        ensure_schema(self._db)

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
                      info: dict[str, Any], now: float, site: str = DEFAULT_SITE,
                      outer_port: int | None = None) -> None:
        """Insert a new worker, or revive a known one at its (possibly new) address and site."""
        self._tx([("""
            INSERT INTO workers (worker_id, seq, ip_address, port, device, info, status,
                                 registered_at, last_heartbeat, site, outer_port)
            VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM workers), ?, ?, ?, ?, 'alive', ?, ?,
                    ?, ?)
            ON CONFLICT (worker_id) DO UPDATE SET
                ip_address = excluded.ip_address, port = excluded.port, device = excluded.device,
                info = excluded.info, status = 'alive', registered_at = excluded.registered_at,
                last_heartbeat = excluded.last_heartbeat, site = excluded.site,
                outer_port = excluded.outer_port,
                phase = NULL, step = NULL, loss = NULL, tokens_per_s = NULL
            """, (worker_id, ip_address, port, device, json.dumps(info), now, now, site,
                  outer_port))])

    def worker(self, worker_id: str) -> WorkerRow | None:
        rows = self._all(f"SELECT {WORKER_COLUMNS} FROM workers WHERE worker_id = ?", (worker_id,))
        return _worker(rows[0]) if rows else None

    def workers(self, status: str | None = None, *, site: str | None = None) -> list[WorkerRow]:
        """Workers in registration order, optionally only those with ``status``, or of
        ``site``."""
        conditions = [(c, v) for c, v in (("status = ?", status), ("site = ?", site)) if v]
        where = ("WHERE " + " AND ".join(c for c, _ in conditions)) if conditions else ""
        args = tuple(v for _, v in conditions)
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

    def credential(self, worker_id: str) -> str | None:
        """The SHA-256 of the worker credential that holds ``worker_id`` (None: unclaimed)."""
        rows = self._all("SELECT credential FROM workers WHERE worker_id = ?", (worker_id,))
        return rows[0][0] if rows else None

    def credential_owner(self, digest: str) -> str | None:
        """The worker id whose credential has SHA-256 ``digest``."""
        rows = self._all("SELECT worker_id FROM workers WHERE credential = ?", (digest,))
        return rows[0][0] if rows else None

    def set_credential(self, worker_id: str, digest: str | None) -> None:
        """Hold ``worker_id`` with the credential of SHA-256 ``digest`` (None: release it)."""
        self._tx([("UPDATE workers SET credential = ? WHERE worker_id = ?", (digest, worker_id))])

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

    def current_generation(self, site: str = DEFAULT_SITE) -> GenerationRow | None:
        """The active generation of ``site``, if any (at most one per site is active)."""
        rows = self._all("SELECT generation, created_at, site FROM generations "
                         "WHERE ended_at IS NULL AND site = ? ORDER BY generation DESC LIMIT 1",
                         (site,))
        return self._with_members(rows[0]) if rows else None

    def active_generations(self) -> list[GenerationRow]:
        """The active generation of every site that has one, by site."""
        rows = self._all("SELECT generation, created_at, site FROM generations "
                         "WHERE ended_at IS NULL ORDER BY site, generation")
        return [self._with_members(r) for r in rows]

    def active_numbers(self) -> dict[str, int]:
        """Each site with an active generation -> that generation's number (one query)."""
        return dict(self._all("SELECT site, MAX(generation) FROM generations "
                              "WHERE ended_at IS NULL GROUP BY site"))

    def generation(self, number: int) -> GenerationRow | None:
        """Generation ``number``, active or ended, with its members as frozen."""
        rows = self._all("SELECT generation, created_at, site FROM generations "
                         "WHERE generation = ?", (number,))
        return self._with_members(rows[0]) if rows else None

    def _with_members(self, row: tuple) -> GenerationRow:
        number, created_at, site = row
        members = [Member(*r) for r in self._all(
            f"SELECT {MEMBER_COLUMNS} FROM members WHERE generation = ? ORDER BY rank",
            (number,))]
        return GenerationRow(number, created_at, members, site)

    def last_generation(self) -> int:
        """The highest generation number ever created, in any site (0 if none)."""
        return self._all("SELECT COALESCE(MAX(generation), 0) FROM generations")[0][0]

    def create_generation(self, workers: list[WorkerRow], *, now: float, at_least: int = 1,
                          site: str = DEFAULT_SITE) -> GenerationRow:
        """Freeze ``workers`` (in order: their ranks) into the next numbered generation of
        ``site``, numbered ``at_least`` or more (numbers are shared by every site)."""
        number = max(self.last_generation() + 1, at_least)
        members = [Member(w.worker_id, w.ip_address, w.port, rank, w.outer_port)
                   for rank, w in enumerate(workers)]
        self._tx([("INSERT INTO generations (generation, created_at, site) VALUES (?, ?, ?)",
                   (number, now, site))] +
                 [("INSERT INTO members (generation, rank, worker_id, ip_address, port, "
                   "outer_port) VALUES (?, ?, ?, ?, ?, ?)",
                   (number, m.rank, m.worker_id, m.ip_address, m.port, m.outer_port))
                  for m in members])
        return GenerationRow(number, now, members, site)

    def end_generation(self, generation: int, *, reason: str, now: float) -> None:
        self._tx([("UPDATE generations SET ended_at = ?, end_reason = ? "
                   "WHERE generation = ? AND ended_at IS NULL", (now, reason, generation))])

    # -- outer rounds --------------------------------------------------------------------------

    def last_round(self) -> int:
        """The highest decided outer round (0 if none)."""
        return self._all("SELECT COALESCE(MAX(round), 0) FROM rounds")[0][0]

    def decide_round(self, number: int, islands: list[IslandRow], *, now: float) -> RoundRow:
        """Record round ``number`` as decided with ``islands``, in one transaction (a round
        already decided is refused by its primary key)."""
        ordered = sorted(islands, key=lambda i: i.site)
        self._tx([("INSERT INTO rounds (round, decided_at) VALUES (?, ?)", (number, now))] +
                 [("INSERT INTO round_islands (round, site, generation, joining) "
                   "VALUES (?, ?, ?, ?)", (number, i.site, i.generation, int(i.joining)))
                  for i in ordered])
        return RoundRow(number, now, ordered)

    def decided_rounds(self, *, after: int | None = None, limit: int) -> list[RoundRow]:
        """Decided rounds in order: the first ``limit`` numbered above ``after``, or without
        ``after`` the newest ``limit``."""
        if after is None:
            rounds = self._all("SELECT round, decided_at FROM rounds ORDER BY round DESC "
                               "LIMIT ?", (limit,))[::-1]
        else:
            rounds = self._all("SELECT round, decided_at FROM rounds WHERE round > ? "
                               "ORDER BY round LIMIT ?", (after, limit))
        if not rounds:
            return []
        islands: dict[int, list[IslandRow]] = {r: [] for r, _ in rounds}
        for number, site, generation, joining in self._all(
                "SELECT round, site, generation, joining FROM round_islands "
                "WHERE round BETWEEN ? AND ? ORDER BY round, site", (rounds[0][0], rounds[-1][0])):
            islands[number].append(IslandRow(site, generation, bool(joining)))
        return [RoundRow(r, at, islands[r]) for r, at in rounds]

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

