"""SQLite rows of the training service: sessions and their ordered operation log.

Shares the ``Store``'s connection and lock (one writer). Every change that a waiter may care
about is one transaction, so a coordinator killed at any moment leaves either the old state or
the new one: a queued or finished operation is never lost, and never finished twice."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

from coordinator.store import Store
from zerop2p.requests import OperationRecord, SessionRecord, SessionRequest

OP_COLUMNS = "session_id, seq, id, kind, status, body, result, error"
SESSION_COLUMNS = "session_id, config, model, base_seq, base_path, created_at"


def digest(body: dict[str, Any]) -> str:
    """SHA-256 of a body's canonical JSON: a retried POST must carry the same one."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _op(row: tuple, *, with_body: bool) -> OperationRecord:
    sid, seq, op_id, kind, status, body, result, error = row
    return OperationRecord(session_id=sid, seq=seq, id=op_id, kind=kind, status=status,
                           body=json.loads(body) if with_body else None,
                           result=json.loads(result) if result else None, error=error)


class SessionStore:
    """Sessions, operations and results over ``store``'s SQLite file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _all(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.store._all(sql, args)

    def session(self, session_id: str) -> SessionRecord | None:
        rows = self._all(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?",
                         (session_id,))
        if not rows:
            return None
        sid, config, model, base_seq, base_path, created = rows[0]
        last = self._all("SELECT MAX(seq) FROM operations WHERE session_id = ?", (sid,))[0][0]
        return SessionRecord(session_id=sid, config=SessionRequest.model_validate_json(config),
                             model=json.loads(model) if model else None, last_seq=last or 0,
                             base_seq=base_seq, base_path=base_path, created_at=created)

    def noise_salt(self, session_id: str) -> str | None:
        """The session's DP noise salt: for its serving workers only, never its clients."""
        rows = self._all("SELECT noise_salt FROM sessions WHERE session_id = ?", (session_id,))
        return rows[0][0] if rows else None

    def sessions(self) -> list[str]:
        return [r[0] for r in self._all("SELECT session_id FROM sessions ORDER BY created_at")]

    def create(self, request: SessionRequest) -> bool:
        """The session and its operation 0 (``create``), in one transaction; False when the
        id exists already (the caller compares configs)."""
        body = request.model_dump()
        now = time.time()
        counts = self.store._tx([
            ("INSERT OR IGNORE INTO sessions (session_id, config, noise_salt, created_at) "
             "VALUES (?, ?, ?, ?)",
             (request.session_id, request.model_dump_json(), secrets.token_hex(16), now)),
            ("INSERT OR IGNORE INTO operations (session_id, seq, kind, body, digest, status, "
             "created_at) VALUES (?, 0, 'create', ?, ?, 'queued', ?)",
             (request.session_id, json.dumps(body), digest(body), now)),
        ])
        return counts[0] == 1

    def operation(self, session_id: str, seq: int, *, with_body: bool = False
                  ) -> OperationRecord | None:
        rows = self._all(f"SELECT {OP_COLUMNS} FROM operations WHERE session_id = ? AND seq = ?",
                         (session_id, seq))
        return _op(rows[0], with_body=with_body) if rows else None

    def op_digest(self, session_id: str, seq: int) -> str | None:
        rows = self._all("SELECT digest FROM operations WHERE session_id = ? AND seq = ?",
                         (session_id, seq))
        return rows[0][0] if rows else None

    def append(self, session_id: str, seq: int, kind: str, body: dict[str, Any]) -> bool:
        """Queue operation ``seq`` if it is exactly the next one; False when it is not."""
        with self.store._lock:
            db = self.store._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT MAX(seq) FROM operations WHERE session_id = ?",
                                  (session_id,)).fetchone()[0]
                if last is None or seq != last + 1:
                    db.execute("ROLLBACK")
                    return False
                db.execute("INSERT INTO operations (session_id, seq, kind, body, digest, status, "
                           "created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                           (session_id, seq, kind, json.dumps(body), digest(body), time.time()))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return True

    def cancel(self, session_id: str, seq: int) -> bool:
        """Cancel a queued operation (no worker has taken it); False otherwise."""
        return self.store._tx([(
            "UPDATE operations SET status = 'cancelled', finished_at = ? "
            "WHERE session_id = ? AND seq = ? AND status = 'queued'",
            (time.time(), session_id, seq))]) == [1]

    def take_next(self, after: int) -> OperationRecord | None:
        """The first operation after id ``after`` that is not cancelled, marked running if it
        was queued: once taken it cannot be cancelled, so every rank of a group sees it."""
        with self.store._lock:
            db = self.store._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(f"SELECT {OP_COLUMNS} FROM operations WHERE id > ? AND "
                                 "status != 'cancelled' ORDER BY id LIMIT 1", (after,)).fetchone()
                if row is not None and row[4] == "queued":
                    db.execute("UPDATE operations SET status = 'running' WHERE id = ?", (row[2],))
                    row = (*row[:4], "running", *row[5:])
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return None if row is None else _op(row, with_body=True)

    def finish(self, op_id: int, *, result: dict | None, error: str | None) -> bool:
        """Record the first result of operation ``op_id``; later ones change nothing. A
        session's creation also stores the model its workers built."""
        statements = [("UPDATE operations SET status = ?, result = ?, error = ?, finished_at = ? "
                       "WHERE id = ? AND status IN ('queued', 'running')",
                       ("failed" if error else "done", json.dumps(result) if result else None,
                        error, time.time(), op_id))]
        if error is None and result is not None and "model" in result:
            statements.append(("UPDATE sessions SET model = ? WHERE session_id = (SELECT "
                               "session_id FROM operations WHERE id = ? AND kind = 'create')",
                               (json.dumps(result["model"]), op_id)))
        return self.store._tx(statements)[0] == 1

    def operation_by_id(self, op_id: int) -> OperationRecord | None:
        rows = self._all(f"SELECT {OP_COLUMNS} FROM operations WHERE id = ?", (op_id,))
        return _op(rows[0], with_body=False) if rows else None

    def set_base(self, session_id: str, seq: int, path: str) -> None:
        """Replays of ``session_id`` start from ``path`` (covering operations up to ``seq``)."""
        self.store._tx([("UPDATE sessions SET base_seq = ?, base_path = ? WHERE session_id = ? "
                         "AND (base_seq IS NULL OR base_seq < ?)", (seq, path, session_id, seq))])

    def resume_point(self) -> int:
        """The id after which a (re-)formed group reads: just before each session's first
        operation past its base, the earliest of them."""
        rows = self._all("""
            SELECT MIN(o.id) FROM operations o JOIN sessions s USING (session_id)
            WHERE o.seq > COALESCE(s.base_seq, -1)""")
        first = rows[0][0]
        if first is None:
            return self._all("SELECT COALESCE(MAX(id), 0) FROM operations")[0][0]
        return first - 1

    def states(self, session_id: str | None) -> list[dict]:
        """Results of finished save_state operations (one session's, or everyone's)."""
        where, args = ("AND session_id = ?", (session_id,)) if session_id else ("", ())
        rows = self._all("SELECT result FROM operations WHERE kind = 'save_state' AND "
                         f"status = 'done' {where} ORDER BY id", args)
        return [json.loads(r[0]) for r in rows]
