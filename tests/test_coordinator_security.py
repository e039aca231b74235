"""Hostile input from a caller that holds the token, sent by hand to a real uvicorn server:
integers at int64's end, control and bidi characters, ids with '/', numbers as strings or
booleans. Each is refused with 4xx naming the field, changes nothing, and a coordinator
restarted on the same SQLite file still forms generations."""

from __future__ import annotations

import logging

import pytest
from coordinator_helpers import TOKEN, client, register, serve

from coordinator.barrier import FLOOR_CAP
from coordinator.config import Settings
from coordinator.fields import MAX_GENERATION
from coordinator.store import Store

pytestmark = pytest.mark.timeout(30)

INT64_MAX = 2**63 - 1
GOOD = {"worker_id": "w9", "ip_address": "127.0.0.1", "port": 50009}


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "c.db")


@pytest.fixture
def http(db):
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as h:
        register(h, "w0")
        yield h


def ready(h, n, **params):
    return h.get("/training/ready", params={"min_workers": n, **params})


def refused(r, status: int, field: str) -> None:
    """``r`` is a ``status`` refusal whose detail and FastAPI error list both name ``field``."""
    assert r.status_code == status, r.text
    body = r.json()
    assert field in body["detail"], body
    assert any(e["loc"][-1] == field for e in body["errors"]), body


def snapshot(h) -> tuple:
    return (h.get("/workers").json(), h.get("/telemetry").json(),
            h.get("/training/generation").json())


def test_after_at_int64_end_is_422_and_later_barriers_answer(http):
    refused(ready(http, 1, after=INT64_MAX), 422, "after")
    refused(ready(http, 1, after=INT64_MAX + 1), 422, "after")
    r = ready(http, 1)
    assert r.status_code == 200 and r.json()["generation"] == 1


def test_after_cannot_drive_the_counter_to_int64s_end(http):
    register(http, "w1", port=50001)
    refused(ready(http, 2, after=INT64_MAX - 1), 422, "after")
    # The largest accepted after lifts the floor to FLOOR_CAP at most, far below the limit ...
    first = ready(http, 2, worker_id="w0", after=MAX_GENERATION).json()["generation"]
    assert first == FLOOR_CAP + 1
    # ... and a leave, a re-registration and a barrier go on numbering up from there.
    http.delete("/workers/w1")
    register(http, "w1", port=50001)
    r = ready(http, 2)
    assert r.status_code == 200 and r.json()["generation"] == first + 1


def test_a_spent_counter_is_refused_not_wrapped(db):
    store = Store(db)
    store.upsert_worker("w0", ip_address="127.0.0.1", port=50000, device=None, info={}, now=0.0)
    gen = store.create_generation(store.workers("alive"), now=0.0, at_least=MAX_GENERATION)
    store.end_generation(gen.generation, reason="test", now=0.0)
    store.close()
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as h:
        r = ready(h, 1)
        assert r.status_code == 409 and "generation" in r.json()["detail"], r.text
        assert h.get("/training/generation").json()["last_generation"] == MAX_GENERATION


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/workers/w0/heartbeat", {"step": 10**20}, "step"),
    ("/workers/w0/heartbeat", {"step": INT64_MAX + 1}, "step"),
    ("/workers/w0/heartbeat", {"step": True}, "step"),
    ("/workers/w0/heartbeat", {"step": "5"}, "step"),
    ("/telemetry", {"worker_id": "w0", "step": 10**20}, "step"),
    ("/telemetry", {"worker_id": "w0", "step": 1.5}, "step"),  # an INTEGER column's poison
    ("/workers/register", {**GOOD, "cpu_cores": 10**20}, "cpu_cores"),
], ids=["hb step 1e20", "hb step 2**63", "hb step true", "hb step '5'", "telemetry step 1e20",
        "telemetry step 1.5", "cpu_cores 1e20"])
def test_integers_out_of_range_or_of_the_wrong_type_are_422(http, path, body, field):
    before = snapshot(http)
    refused(http.post(path, json=body), 422, field)
    assert snapshot(http) == before
    assert http.get("/workers").status_code == 200


HYGIENE = [
    ("ip newline", {**GOOD, "ip_address": "10.0.0.1\nFORGED coordinator INFO w0 left"},
     "ip_address"),
    ("ip not a host", {**GOOD, "ip_address": "not a host!"}, "ip_address"),
    ("ip 999.1.1.1", {**GOOD, "ip_address": "999.1.1.1"}, "ip_address"),
    ("device escape", {**GOOD, "device": "cpu\x1b[31m"}, "device"),
    ("device newline", {**GOOD, "device": "cpu\nFORGED"}, "device"),
    ("id slash", {**GOOD, "worker_id": "a/b"}, "worker_id"),
    ("id C1 NEL", {**GOOD, "worker_id": "a\x85b"}, "worker_id"),
    ("id RLO", {**GOOD, "worker_id": "evil\u202egnp.exe"}, "worker_id"),
    ("id LRI", {**GOOD, "worker_id": "a\u2066b"}, "worker_id"),
    ("id zero width", {**GOOD, "worker_id": "w\u200b0"}, "worker_id"),
    ("port '6000'", {**GOOD, "port": "6000"}, "port"),
    ("port true", {**GOOD, "port": True}, "port"),
    ("extra newline", {**GOOD, "region": "eu\nFORGED"}, "region"),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in HYGIENE], ids=[c[0] for c in HYGIENE])
def test_registration_text_and_ports_are_checked(http, caplog, body, field):
    before = snapshot(http)
    with caplog.at_level(logging.INFO):
        refused(http.post("/workers/register", json=body), 422, field)
    assert snapshot(http) == before
    assert "FORGED" not in caplog.text  # nothing of it reached a log line


def test_heartbeat_phase_with_control_characters_is_422(http):
    before = snapshot(http)
    refused(http.post("/workers/w0/heartbeat", json={"phase": "train\nFORGED"}), 422, "phase")
    refused(http.post("/workers/w0/heartbeat", json={"phase": "tr\u202eain"}), 422, "phase")
    assert snapshot(http) == before


def test_what_workers_send_is_still_accepted(http):
    for worker_id, host in (("worker-1a2b3c4d", "127.0.0.1"), ("w1", "node-7.cluster.local"),
                            ("w2", "::1"), ("w3", "fe80::1:2"), ("w4", "localhost")):
        r = http.post("/workers/register", json={"worker_id": worker_id, "ip_address": host,
                                                 "port": 6000, "device": "cuda:0"})
        assert r.status_code == 200, r.text
    r = http.post("/workers/worker-1a2b3c4d/heartbeat",
                  json={"phase": "train", "step": 2**53, "loss": 1.5, "tokens_per_s": 10.0})
    assert r.status_code == 200, r.text
    assert http.post("/telemetry", json={"worker_id": "w1", "step": 3, "loss": 10**30,
                                         "skipped": 0}).status_code == 200


def test_restart_after_every_attack_still_forms_generations(db):
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as h:
        register(h, "w0")
        register(h, "w1", port=50001)
        ready(h, 2, worker_id="w0", after=INT64_MAX - 1)
        h.delete("/workers/w1")
        register(h, "w1", port=50001)
        ready(h, 2, after=INT64_MAX)
        h.post("/workers/w0/heartbeat", json={"step": 10**20, "phase": "x\ny"})
        h.post("/telemetry", json={"worker_id": "w0", "step": 1.5})
        for body, _ in [c[1:] for c in HYGIENE]:
            h.post("/workers/register", json=body)
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as h:
        assert h.get("/workers").status_code == 200
        register(h, "w2", port=50002)
        register(h, "w3", port=50003)
        h.delete("/workers/w0")
        r = ready(h, 2, worker_id="w2", wait=2)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["ready"] and 0 < answer["generation"] <= MAX_GENERATION
        assert [w["worker_id"] for w in answer["workers"]] == ["w1", "w2", "w3"]
