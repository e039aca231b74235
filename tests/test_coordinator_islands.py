"""Sites (islands) at a real coordinator: one generation per site, and the outer rounds that
decide which islands average together (``coordinator/islands.py``), through HTTP and through
the worker's ``Membership``."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from coordinator_helpers import TOKEN, client, heartbeats, register, serve, statuses

from coordinator.config import Settings
from worker.membership.client import CoordinatorClient, CoordinatorError, PeerInfo, RoundInfo
from worker.membership.facade import Membership

pytestmark = pytest.mark.timeout(20)

SITES = {"alpha": ("a0", "a1"), "beta": ("b0", "b1")}
PORTS = {"a0": 50000, "a1": 50001, "b0": 50010, "b1": 50011}


def outer(worker_id: str) -> int:
    return PORTS[worker_id] + 1000


def ready(http, n, **params) -> dict:
    r = http.get("/training/ready", params={"min_workers": n, **params})
    assert r.status_code == 200, r.text
    return r.json()


def members(answer) -> list[tuple[str, int]]:
    return [(w["worker_id"], w["rank"]) for w in answer["workers"]]


def two_islands(http) -> dict[str, int]:
    """Register both sites' workers with outer ports; freeze each site; site -> generation."""
    for site, ids in SITES.items():
        for w in ids:
            register(http, w, port=PORTS[w], site=site, outer_port=outer(w))
    return {site: ready(http, 2, site=site)["generation"] for site in SITES}


def post(http, number, worker_id, generation, *, site=None, islands=2, quorum_timeout=30.0,
         wait=0.0, joining=False, status=200) -> dict:
    site = site or ("alpha" if worker_id.startswith("a") else "beta")
    r = http.post(f"/islands/rounds/{number}", json={
        "worker_id": worker_id, "site": site, "generation": generation, "joining": joining,
        "islands": islands, "quorum_timeout": quorum_timeout, "wait": wait})
    assert r.status_code == status, r.text
    return r.json()


def island(site, generation, ids, joining=False) -> dict:
    return {"site": site, "generation": generation, "joining": joining,
            "members": [{"worker_id": w, "ip_address": "127.0.0.1", "port": outer(w), "rank": r}
                        for r, w in enumerate(ids)]}


def db_rows(db, table) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()


# -- generations per site ------------------------------------------------------------------------

def test_sites_form_independent_generations_numbered_across_sites(url):
    with client(url) as http:
        register(http, "a0", port=50000, site="alpha")
        register(http, "d0", port=50005)  # no site: the default one
        # alpha's barrier counts alpha's workers only: d0 does not complete it.
        waiting = ready(http, 2, site="alpha")
        assert not waiting["ready"] and waiting["active_workers"] == 1
        assert members(waiting) == [("a0", None)]
        register(http, "a1", port=50001, site="alpha")
        register(http, "b0", port=50010, site="beta")
        alpha = ready(http, 2, site="alpha", worker_id="a1")
        beta = ready(http, 1, site="beta", worker_id="b0")
        default = ready(http, 1)
        assert members(alpha) == [("a0", 0), ("a1", 1)]
        assert members(beta) == [("b0", 0)] and members(default) == [("d0", 0)]
        numbers = [alpha["generation"], beta["generation"], default["generation"]]
        assert numbers == [1, 2, 3]  # unique across sites, so wire keys never collide
        # A worker of another site asking for alpha's barrier is no member of it.
        assert not ready(http, 2, site="alpha", worker_id="b0")["ready"]
        for site, number in (("alpha", 1), ("beta", 2), ("default", 3)):
            view = http.get("/training/generation", params={"site": site}).json()
            assert (view["site"], view["generation"], view["last_generation"]) == (site, number, 3)
        assert http.get("/training/generation").json()["generation"] == 3
        none = http.get("/training/generation", params={"site": "gamma"}).json()
        assert none["generation"] is None and none["workers"] == []
        rows = {w["worker_id"]: (w["site"], w["outer_port"]) for w in http.get("/workers").json()}
        assert rows == {"a0": ("alpha", None), "d0": ("default", None), "a1": ("alpha", None),
                        "b0": ("beta", None)}
        bad = http.get("/training/ready", params={"min_workers": 1, "site": "-x"})
        assert bad.status_code == 422 and "site" in bad.json()["detail"]


def test_a_death_ends_only_its_own_sites_generation(fast_url):
    with client(fast_url) as http:
        gens = two_islands(http)
        assert gens == {"alpha": 1, "beta": 2}
        with heartbeats(fast_url, ["a0", "b0", "b1"]):  # a1 falls silent
            again = ready(http, 1, site="alpha", worker_id="a0", after=1, wait=10)
            assert statuses(http)["a1"] == "dead"
            assert again["generation"] == 3 and members(again) == [("a0", 0)]
            beta = http.get("/training/generation", params={"site": "beta"}).json()
            assert beta["generation"] == 2  # beta trains on, untouched
            assert ready(http, 2, site="beta", worker_id="b1")["generation"] == 2
            # A leave in beta ends beta's generation only.
            assert http.delete("/workers/b1").status_code == 200
            assert http.get("/training/generation",
                            params={"site": "beta"}).json()["generation"] is None
            assert http.get("/training/generation",
                            params={"site": "alpha"}).json()["generation"] == 3
            # A member re-registering at another site ends the generation it was in.
            register(http, "a0", port=50000, site="beta")
            assert http.get("/training/generation",
                            params={"site": "alpha"}).json()["generation"] is None
            assert ready(http, 2, site="beta")["generation"] == 4


# -- outer rounds --------------------------------------------------------------------------------

def test_a_round_is_decided_when_both_islands_arrive_and_every_rank_sees_it(url):
    with client(url) as http:
        gens = two_islands(http)
        got = {}

        def first():
            with client(url) as other:
                got["answer"] = post(other, 1, "a0", gens["alpha"], wait=10)
                got["at"] = time.monotonic()

        thread = threading.Thread(target=first)
        thread.start()
        time.sleep(0.4)
        assert "answer" not in got  # alpha alone: parked in its long-poll
        arrived = time.monotonic()
        answer = post(http, 1, "b1", gens["beta"], wait=10)
        thread.join(5)
        assert got["at"] - arrived < 1.0  # woken by the arrival, not by a poll period
        assert answer == got["answer"] == {"round": 1, "decided": True, "islands": [
            island("alpha", gens["alpha"], SITES["alpha"]),
            island("beta", gens["beta"], SITES["beta"])]}
        for w in ("a1", "b0", "a0"):  # every rank, later, gets the same answer at once
            assert post(http, 1, w, gens["alpha" if w[0] == "a" else "beta"]) == answer
        # Negative control: round 2 with alpha alone stays undecided and says who arrived.
        t0 = time.monotonic()
        pending = post(http, 2, "a1", gens["alpha"], wait=0.3)
        assert 0.25 <= time.monotonic() - t0 < 1.5
        assert pending == {"round": 2, "decided": False,
                           "islands": [island("alpha", gens["alpha"], SITES["alpha"])]}
        metrics = http.get("/metrics").text
        for line in ('zerop2p_site_generation{site="alpha"} 1.0',
                     'zerop2p_site_generation{site="beta"} 2.0', "zerop2p_outer_round 1.0"):
            assert line in metrics.splitlines(), metrics
        listed = http.get("/islands/rounds").json()
        assert [(r["round"], r["islands"]) for r in listed] == [(1, [
            {"site": "alpha", "generation": 1, "joining": False},
            {"site": "beta", "generation": 2, "joining": False}])]


def test_the_quorum_timeout_decides_without_the_late_island(url):
    with client(url) as http:
        gens = two_islands(http)
        t0 = time.monotonic()
        answer = post(http, 1, "a0", gens["alpha"], quorum_timeout=0.5, wait=10)
        elapsed = time.monotonic() - t0
        assert 0.45 <= elapsed < 1.5, elapsed
        alone = {"round": 1, "decided": True,
                 "islands": [island("alpha", gens["alpha"], SITES["alpha"])]}
        assert answer == alone
        # The late island gets the frozen decision, without itself, at once.
        t0 = time.monotonic()
        assert post(http, 1, "b0", gens["beta"], quorum_timeout=30, wait=10) == alone
        assert time.monotonic() - t0 < 0.5
        # It joins round 2: counted with its joining flag from its first post.
        assert not post(http, 2, "b1", gens["beta"], joining=True, wait=0.1)["decided"]
        both = post(http, 2, "a1", gens["alpha"])
        assert both["decided"] and both["islands"] == [
            island("alpha", gens["alpha"], SITES["alpha"]),
            island("beta", gens["beta"], SITES["beta"], joining=True)]
        assert post(http, 2, "b0", gens["beta"], joining=False) == both  # frozen


def test_refusals_name_the_worker_site_and_numbers_and_count_nothing(url, tmp_path):
    db = str(tmp_path / "c.db")
    with client(url) as http:
        gens = two_islands(http)
        register(http, "lone", port=50020, site="gamma")  # no outer port
        assert ready(http, 1, site="gamma")["generation"] == 3
        before = db_rows(db, "rounds")
        r = post(http, 1, "b0", 1, status=409)  # beta's generation is 2
        assert all(s in r["detail"] for s in ("'b0'", "'beta'", "generation 1", "is 2")), r
        r = post(http, 1, "a0", gens["alpha"], site="beta", status=409)
        assert "'a0' is registered at site 'alpha', not 'beta'" in r["detail"], r
        r = post(http, 1, "lone", 3, site="gamma", status=409)
        assert "without an outer_port (lone)" in r["detail"], r
        assert "unknown worker 'ghost'" in post(http, 1, "ghost", 1, status=404)["detail"]
        for change, field in (({"islands": 0}, "islands"), ({"quorum_timeout": 61}, "quorum"),
                              ({"wait": -1}, "wait"), ({"site": "a b"}, "site"),
                              ({"joining": "yes"}, "joining"), ({"extra": 1}, "extra"),
                              ({"generation": True}, "generation")):
            body = {"worker_id": "a0", "site": "alpha", "generation": 1, "islands": 2,
                    "quorum_timeout": 1.0, **change}
            r = http.post("/islands/rounds/1", json=body)
            assert r.status_code == 422 and field in r.json()["detail"], (change, r.text)
        assert http.post("/islands/rounds/0", json={}).status_code == 422
        assert db_rows(db, "rounds") == before == []
        # None of the refused posts was counted: alpha alone is all that has arrived.
        pending = post(http, 1, "a0", gens["alpha"])
        assert not pending["decided"] and [i["site"] for i in pending["islands"]] == ["alpha"]
        r = post(http, 3, "b0", gens["beta"], status=409)  # round 1 is open
        assert "round 3" in r["detail"] and "next round to decide is 1" in r["detail"], r
        with client(url, token=None) as anon:
            assert anon.post("/islands/rounds/1", json={}).status_code == 401
            assert anon.get("/islands/rounds").status_code == 401


def test_a_site_whose_generation_ends_is_dropped_from_the_pending_round(url):
    with client(url) as http:
        gens = two_islands(http)
        assert not post(http, 1, "b0", gens["beta"], islands=3)["decided"]
        got = {}

        def waiting_beta():
            with client(url) as other:
                got["answer"] = post(other, 1, "b0", gens["beta"], islands=3, wait=10,
                                     status=409)
                got["at"] = time.monotonic()

        thread = threading.Thread(target=waiting_beta)
        thread.start()
        time.sleep(0.3)
        left = time.monotonic()
        assert http.delete("/workers/b1").status_code == 200  # beta's generation ends
        thread.join(5)
        assert got["at"] - left < 1.0  # the long-poll learned it at once
        assert "active generation is none" in got["answer"]["detail"]
        pending = post(http, 1, "a0", gens["alpha"], islands=3)
        assert [i["site"] for i in pending["islands"]] == ["alpha"]  # beta no longer counted
        # beta re-forms and posts again with its new generation.
        again = ready(http, 1, site="beta", worker_id="b0")["generation"]
        answer = post(http, 1, "b0", again, islands=2)
        assert answer["decided"] and [(i["site"], i["generation"]) for i in answer["islands"]] \
            == [("alpha", gens["alpha"]), ("beta", again)]


def test_decided_rounds_survive_a_restart(tmp_path):
    settings = Settings(db=str(tmp_path / "c.db"), token=TOKEN)
    with serve(settings) as (url, _), client(url) as http:
        gens = two_islands(http)
        first = post(http, 1, "b0", gens["beta"], quorum_timeout=0, wait=1)
        post(http, 2, "a0", gens["alpha"])
        second = post(http, 2, "b0", gens["beta"])
        listed = http.get("/islands/rounds").json()
    assert first["decided"] and [i["site"] for i in first["islands"]] == ["beta"]
    assert second["decided"] and len(second["islands"]) == 2
    with serve(settings) as (url, _), client(url) as http:
        assert post(http, 1, "a1", gens["alpha"]) == first
        assert post(http, 2, "b1", gens["beta"]) == second
        assert http.get("/islands/rounds").json() == listed
        assert [r["round"] for r in http.get("/islands/rounds", params={"after": 1}).json()] == [2]
        assert [r["round"] for r in http.get("/islands/rounds", params={"limit": 1}).json()] == [2]
        r = post(http, 4, "a0", gens["alpha"], status=409)
        assert "next round to decide is 3" in r["detail"] and "round 2 was the last" in r["detail"]


OLD_SCHEMA = """
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, ip_address TEXT NOT NULL,
    port INTEGER NOT NULL, device TEXT, info TEXT NOT NULL DEFAULT '{}', status TEXT NOT NULL,
    registered_at REAL NOT NULL, last_heartbeat REAL NOT NULL,
    phase TEXT, step INTEGER, loss REAL, tokens_per_s REAL);
CREATE TABLE generations (generation INTEGER PRIMARY KEY, created_at REAL NOT NULL,
    ended_at REAL, end_reason TEXT);
CREATE TABLE members (generation INTEGER NOT NULL REFERENCES generations(generation),
    rank INTEGER NOT NULL, worker_id TEXT NOT NULL, ip_address TEXT NOT NULL,
    port INTEGER NOT NULL, PRIMARY KEY (generation, rank));
CREATE TABLE telemetry (id INTEGER PRIMARY KEY AUTOINCREMENT, worker_id TEXT NOT NULL,
    ts REAL NOT NULL, metrics TEXT NOT NULL);
INSERT INTO workers VALUES ('w0', 1, '127.0.0.1', 50000, 'cpu', '{}', 'alive', 1.0, 1.0,
    NULL, NULL, NULL, NULL);
INSERT INTO generations VALUES (7, 1.0, NULL, NULL);
INSERT INTO members VALUES (7, 0, 'w0', '127.0.0.1', 50000);
"""


def columns(db, table) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_a_store_from_before_sites_is_upgraded_in_place(tmp_path):
    db = str(tmp_path / "old.db")
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
    assert "site" not in columns(db, "workers")  # the control: the file really is old
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as http:
        [w0] = http.get("/workers").json()
        assert (w0["worker_id"], w0["site"], w0["outer_port"]) == ("w0", "default", None)
        old = ready(http, 1, worker_id="w0")  # the old generation is the default site's
        assert old["generation"] == 7 and members(old) == [("w0", 0)]
        register(http, "w0", port=50000, outer_port=51000)  # ends 7, as a member's return does
        register(http, "x0", port=50001, site="alpha", outer_port=51001)
        assert ready(http, 1)["generation"] == 8 and ready(http, 1, site="alpha")["generation"] == 9
        assert post(http, 1, "x0", 9, site="alpha", islands=1)["decided"]
    assert {"site", "outer_port"} <= columns(db, "workers")
    assert "site" in columns(db, "generations") and "outer_port" in columns(db, "members")
    with serve(Settings(db=db, token=TOKEN)) as (url, _), client(url) as http:  # opens again
        assert [r["round"] for r in http.get("/islands/rounds").json()] == [1]


# -- the worker's side ---------------------------------------------------------------------------

def test_two_sites_run_one_outer_round_through_membership(url):
    ms = [Membership(url, token=TOKEN, worker_id=w, ip_address="127.0.0.1", port=PORTS[w],
                     site=site, outer_port=outer(w), heartbeat_interval=0.5)
          for site, ids in SITES.items() for w in ids]
    try:
        with ThreadPoolExecutor(4) as pool:
            gens = list(pool.map(lambda m: m.join(2, timeout=10), ms))
            assert [g.site for g in gens] == ["alpha", "alpha", "beta", "beta"]
            assert gens[0].generation == gens[1].generation != gens[2].generation \
                == gens[3].generation
            assert sorted(g.rank for g in gens[:2]) == sorted(g.rank for g in gens[2:]) == [0, 1]
            rounds = list(pool.map(lambda m: m.outer_round(1, islands=2, quorum_timeout=10,
                                                           timeout=10), ms))
        assert all(r == rounds[0] for r in rounds)
        info = rounds[0]
        assert isinstance(info, RoundInfo) and info.round == 1
        assert [(i.site, i.generation, i.joining) for i in info.islands] == [
            ("alpha", gens[0].generation, False), ("beta", gens[2].generation, False)]
        for i, g in zip(info.islands, (gens[0], gens[2])):
            assert i.members == [PeerInfo(p.worker_id, p.ip_address, outer(p.worker_id), p.rank)
                                 for p in g.peers]
        assert info.island("beta") is info.islands[1] and info.island("gamma") is None
        assert info.island("beta", gens[2].generation) is info.islands[1]
        assert info.island("beta", gens[2].generation + 10) is None
        assert ms[0].last_round() == 1
        with pytest.raises(CoordinatorError) as refused:  # a round out of turn
            ms[2].outer_round(5, islands=2, quorum_timeout=1, timeout=5)
        assert refused.value.status == 409 and "next round to decide is 2" in refused.value.message
    finally:
        for m in ms:
            m.close()


async def test_outer_round_times_out_naming_the_round_site_and_arrivals(url):
    with client(url) as http:
        gens = two_islands(http)
    c = CoordinatorClient(url, token=TOKEN, worker_id="a0")
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"outer round 1 for site alpha \(generation 1\) "
                                               r"not decided within 0\.5s; 2 islands expected, "
                                               r"arrived: alpha"):
            await c.outer_round(1, site="alpha", generation=gens["alpha"], joining=False,
                                islands=2, quorum_timeout=30, timeout=0.5)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(CoordinatorError, match="422.*quorum_timeout"):  # before sending
            await c.outer_round(1, site="alpha", generation=1, joining=False, islands=2,
                                quorum_timeout=61, timeout=1)
    finally:
        await c.close()
