"""The coordinator's OpenAPI schema tells the truth: schemathesis fuzzes a real uvicorn server
(SQLite file, token) with every default check, and refused requests change no row.

The fuzzer is schemathesis' own CLI (its examples, coverage, fuzzing and stateful phases, the
stateful links inferred from the schema), run as a child process against a coordinator in this
process; its HAR record is read back to count the requests and their statuses. A fixed seed
keeps CI reproducible; ``ZEROP2P_FUZZ_SEED`` and ``ZEROP2P_FUZZ_EXAMPLES`` widen a local run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import schemathesis
from coordinator_helpers import TOKEN, client, register, serve
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from coordinator.config import MAX_BODY_BYTES, Settings

pytestmark = pytest.mark.timeout(120)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED = int(os.environ.get("ZEROP2P_FUZZ_SEED", "20260601"))
EXAMPLES = int(os.environ.get("ZEROP2P_FUZZ_EXAMPLES", "60"))
MIN_REQUESTS = 1000
TABLES = ("workers", "generations", "members", "telemetry", "sessions", "operations")


@pytest.fixture
def coordinator(tmp_path):
    """A coordinator on a real SQLite file; long-polls capped at 50 ms so the fuzzer's ``wait``
    values (up to the documented 60 s) cost it nothing."""
    db = tmp_path / "c.db"
    with serve(Settings(db=str(db), token=TOKEN, heartbeat_timeout=30.0, max_wait=0.05)) as (
            url, _):
        yield url, db


def rows(db) -> dict[str, list[tuple]]:
    """Every row of every table, read through a connection of its own (WAL: committed state)."""
    with sqlite3.connect(db) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in TABLES}


def test_schemathesis_finds_no_failure(coordinator, tmp_path):
    url, _ = coordinator
    report_json, har = tmp_path / "report.json", tmp_path / "requests.har"
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file",
            str(Path(__file__).with_name("schemathesis.toml")), "run", f"{url}/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}", "--seed", str(SEED),
            "--max-examples", str(EXAMPLES), "--workers", "1", "--request-timeout", "10",
            "--report", "json,har", "--report-json-path", str(report_json),
            "--report-har-path", str(har), "--output-truncate", "false"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    report = json.loads(report_json.read_text())
    assert report["failures"] == [] and report["errors"] == [], report["failures"]
    assert report["operations"]["tested"] == report["operations"]["total"] == 24
    phases = {name: p["status"] for name, p in report["phases"].items()}
    assert {phases[p] for p in ("coverage", "fuzzing", "stateful")} == {"success"}, phases
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [e["response"]["status"] for e in entries]
    assert len(statuses) >= MIN_REQUESTS, (len(statuses), report["test_cases"])
    assert [s for s in statuses if s >= 500] == []
    print(f"schemathesis: {len(statuses)} requests, {report['test_cases']['generated']} cases, "
          f"statuses {sorted(set(statuses))}, 0 failures")
    # The fuzzer reached both sides of the door: accepted requests and every kind of refusal.
    assert {200, 401, 404, 422} <= set(statuses), sorted(set(statuses))


def test_refused_requests_change_no_row(coordinator):
    url, db = coordinator
    with client(url) as http:
        register(http, "w0")
        register(http, "w1", port=50001)
        assert http.delete("/workers/w1").status_code == 200
        http.post("/telemetry", json={"worker_id": "w0", "step": 1, "loss": 2.0})
        assert http.get("/training/ready", params={"min_workers": 1}).json()["generation"] == 1
        by_hand = [
            ("POST", "/workers/w1/heartbeat", AUTH, {}),  # left: 409
            ("POST", "/workers/ghost/heartbeat", AUTH, {}),  # 404
            ("DELETE", "/workers/ghost", AUTH, None),
            ("POST", "/telemetry", AUTH, {"worker_id": "ghost", "step": 1}),
            ("POST", "/workers/register", {}, {"worker_id": "w9", "ip_address": "::1",
                                               "port": 1}),  # no token: 401
            ("DELETE", "/workers/w0", {"Authorization": "Bearer wrong"}, None),
            ("POST", "/workers/register", AUTH, {"worker_id": "w9", "ip_address": "::1",
                                                 "port": 1, "pad": "x" * MAX_BODY_BYTES}),
            ("GET", "/training/ready", AUTH, None),  # min_workers missing: 422
        ]
        before = rows(db)
        for method, path, headers, body in by_hand:
            with httpx.Client(base_url=url, headers=headers) as other:
                r = other.request(method, path, json=body)
            assert 400 <= r.status_code < 500, (method, path, r.status_code)
        assert rows(db) == before

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    refused = []

    for operation in operations:
        for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE):
            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case):
                before = rows(db)
                response = case.call(base_url=url, headers=AUTH, timeout=10)
                assert response.status_code < 500, (case.method, case.formatted_path)
                if 400 <= response.status_code < 500:
                    refused.append(response.status_code)
                    assert rows(db) == before, (case.method, case.formatted_path, case.body)

            try:
                one()
            except Unsatisfiable:  # nothing to make invalid: no parameters, no body
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert len(refused) >= 50 and {404, 422} <= set(refused), sorted(set(refused))
