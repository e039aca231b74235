"""The training-ready barrier: generations, long-poll promptness, what ends a generation."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from coordinator_helpers import TOKEN, client, heartbeats, register, serve, statuses

from coordinator.config import Settings

pytestmark = pytest.mark.timeout(30)




def ready(http, n, **params):
    r = http.get("/training/ready", params={"min_workers": n, **params})
    assert r.status_code == 200, r.text
    return r.json()


def members(answer):
    return [(w["worker_id"], w["rank"]) for w in answer["workers"]]


def test_barrier_freezes_one_generation_for_everyone(url):
    with client(url) as http:
        for w in ("w0", "w1"):
            register(http, w, port=50000 + int(w[1]))
        answer = ready(http, 3, worker_id="w0")
        assert answer == {"ready": False, "active_workers": 2, "min_workers": 3,
                          "generation": None,
                          "workers": [{"worker_id": "w0", "ip_address": "127.0.0.1",
                                       "port": 50000, "rank": None},
                                      {"worker_id": "w1", "ip_address": "127.0.0.1",
                                       "port": 50001, "rank": None}]}
        register(http, "w2", port=50002)
        answers = [ready(http, 3, worker_id=w) for w in ("w2", "w0", "w1")]
        assert all(a == answers[0] for a in answers)
        assert answers[0]["ready"] and answers[0]["generation"] == 1
        assert members(answers[0]) == [("w0", 0), ("w1", 1), ("w2", 2)]  # registration order
        # A latecomer does not join a running generation: it sees itself absent ...
        register(http, "w3", port=50003)
        late = ready(http, 3)
        assert late["ready"] and late["generation"] == 1 and "w3" not in dict(members(late))
        assert late["active_workers"] == 4
        # ... or, naming itself, sees ready false while generation 1 runs.
        mine = ready(http, 3, worker_id="w3")
        assert not mine["ready"] and mine["generation"] == 1
        # Members still get the same answer, whatever min_workers they ask for.
        assert ready(http, 2, worker_id="w1")["workers"] == answers[0]["workers"]


def test_concurrent_first_callers_get_one_generation(url):
    with client(url) as http:
        for i in range(6):
            register(http, f"w{i}", port=50000 + i)

    def ask(i):
        with client(url) as http:
            return ready(http, 6, worker_id=f"w{i}", wait=5)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert {a["generation"] for a in answers} == {1}
    assert all(members(a) == [(f"w{i}", i) for i in range(6)] for a in answers)


def test_long_poll_returns_promptly_when_the_last_worker_arrives(url):
    with client(url) as http:
        register(http, "w0")
        got = {}

        def waiter():
            with client(url) as other:
                got["answer"] = ready(other, 2, worker_id="w0", wait=20)
                got["at"] = time.monotonic()

        thread = threading.Thread(target=waiter)
        started = time.monotonic()
        thread.start()
        time.sleep(0.5)  # the waiter is parked in its long-poll
        assert "answer" not in got
        arrived = time.monotonic()
        register(http, "w1")
        thread.join(5)
    assert got["answer"]["ready"] and members(got["answer"]) == [("w0", 0), ("w1", 1)]
    assert got["at"] - arrived < 1.0
    assert got["at"] - started < 2.0


def test_long_poll_expires_with_ready_false(url):
    with client(url) as http:
        register(http, "w0")
        t0 = time.monotonic()
        answer = ready(http, 2, wait=0.5)
        elapsed = time.monotonic() - t0
    assert not answer["ready"] and answer["active_workers"] == 1
    assert 0.45 <= elapsed < 1.5


def test_death_ends_the_generation_and_the_next_is_numbered_up(fast_url):
    with client(fast_url) as http:
        for w in ("w0", "w1", "w2"):
            register(http, w)
        with heartbeats(fast_url, ["w0", "w1"]):
            first = ready(http, 3, worker_id="w0")
            assert first["generation"] == 1 and len(first["workers"]) == 3
            # Survivors ask for a newer generation: they wait until w2's death ends 1 ...
            t0 = time.monotonic()
            second = ready(http, 2, worker_id="w0", after=1, wait=10)
            waited = time.monotonic() - t0
            assert statuses(http) == {"w0": "alive", "w1": "alive", "w2": "dead"}
            assert second["ready"] and second["generation"] == 2
            assert members(second) == [("w0", 0), ("w1", 1)]
            assert waited < 2.0  # 1 s timeout, not a polling period
            assert ready(http, 2, worker_id="w1") == second
            # A dead worker's heartbeat is refused; it must register again.
            r = http.post("/workers/w2/heartbeat", json={})
            assert r.status_code == 409 and "register again" in r.json()["detail"]


def test_leave_and_reregistration_of_a_member_end_the_generation(url):
    with client(url) as http:
        for w in ("w0", "w1", "w2"):
            register(http, w)
        assert ready(http, 3)["generation"] == 1
        assert http.delete("/workers/w2").status_code == 200
        assert not ready(http, 3)["ready"]
        assert ready(http, 2)["generation"] == 2
        register(http, "w9")  # a non-member registering does not disturb generation 2
        assert ready(http, 2)["generation"] == 2
        register(http, "w1", port=50111)  # a member restarted: its old process is gone
        third = ready(http, 2)
        assert third["generation"] == 3
        assert [(w["worker_id"], w["port"]) for w in third["workers"]] == [
            ("w0", 50000), ("w1", 50111), ("w9", 50000)]


def test_generation_ends_when_every_live_member_asks_for_a_newer_one(url):
    with client(url) as http:
        for w in ("w0", "w1"):
            register(http, w)
        assert ready(http, 2)["generation"] == 1
        # w0 alone saw a failure: generation 1 stays (w1 may still be training in it).
        assert not ready(http, 2, worker_id="w0", after=1)["ready"]
        assert ready(http, 2, worker_id="w1")["generation"] == 1
        # w1 saw it too: nobody alive is left in generation 1, so generation 2 forms.
        answer = ready(http, 2, worker_id="w1", after=1)
        assert answer["ready"] and answer["generation"] == 2
        assert ready(http, 2, worker_id="w0", after=1)["generation"] == 2


def test_a_coordinator_that_lost_its_state_numbers_above_what_workers_saw(tmp_path):
    """On ``:memory:`` a restart forgets every generation; a worker that saw generation 5 and
    asks for a newer one gets 6, never a reused 1 that old messages may still carry."""
    with serve(Settings(db=":memory:", token=TOKEN)) as (u, _), client(u) as http:
        for w in ("w0", "w1"):
            register(http, w)
        assert ready(http, 2, worker_id="w0", after=5)["generation"] == 6
        assert ready(http, 2, worker_id="w1")["generation"] == 6
        http.delete("/workers/w1")
        assert ready(http, 1, worker_id="w0")["generation"] == 7
