"""The coordinator's HTTP contract against a real uvicorn: registry, auth, bad input,
telemetry and /metrics."""

from __future__ import annotations

import json

import httpx
import pytest
from coordinator_helpers import TOKEN, client, register, serve, statuses
from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import Settings

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def coord(tmp_path):
    """A fresh coordinator for a test that counts what is in it."""
    settings = Settings(db=str(tmp_path / "c.db"), token=TOKEN, heartbeat_timeout=30.0)
    with serve(settings) as (url, app), client(url) as http:
        yield http


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory):
    """One coordinator for the table tests, which compare state before and after."""
    db = tmp_path_factory.mktemp("shared") / "c.db"
    with serve(Settings(db=str(db), token=TOKEN, heartbeat_timeout=30.0)) as (url, _):
        yield url


@pytest.fixture
def shared(shared_url):
    with client(shared_url) as http:
        yield http


def snapshot(http: httpx.Client) -> tuple:
    return http.get("/workers").json(), http.get("/telemetry").json()


def test_register_list_and_reregister(coord):
    register(coord, "w0", port=50001, device="cuda:0", gpu_name="H100", cpu_cores=16, ram_gb=128,
             bandwidth_mbps=10000, region="eu")
    register(coord, "w1", port=50002)
    workers = coord.get("/workers").json()
    assert [(w["worker_id"], w["status"], w["port"]) for w in workers] == [
        ("w0", "alive", 50001), ("w1", "alive", 50002)]
    assert workers[0]["device"] == "cuda:0"
    assert workers[0]["info"] == {"gpu_name": "H100", "cpu_cores": 16, "ram_gb": 128.0,
                                  "bandwidth_mbps": 10000.0, "region": "eu"}
    # A restarted worker re-registers at a new address: not an error, still first in order.
    r = coord.post("/workers/register",
                   json={"worker_id": "w0", "ip_address": "10.0.0.9", "port": 50009})
    assert r.status_code == 200 and "re-registered" in r.json()["message"]
    workers = coord.get("/workers").json()
    assert [(w["worker_id"], w["ip_address"], w["port"]) for w in workers] == [
        ("w0", "10.0.0.9", 50009), ("w1", "127.0.0.1", 50002)]


def test_heartbeat_unknown_left_and_status(coord):
    r = coord.post("/workers/ghost/heartbeat", json={})
    assert r.status_code == 404 and "register first" in r.json()["detail"]
    register(coord, "w0")
    before = coord.get("/workers").json()[0]["last_heartbeat"]
    assert coord.post("/workers/w0/heartbeat").status_code == 200  # no body at all is fine
    r = coord.post("/workers/w0/heartbeat",
                   json={"phase": "train", "step": 7, "loss": 2.5, "tokens_per_s": 900.0})
    assert r.status_code == 200
    w = coord.get("/workers").json()[0]
    assert (w["phase"], w["step"], w["loss"], w["tokens_per_s"]) == ("train", 7, 2.5, 900.0)
    assert w["last_heartbeat"] >= before
    # A NaN loss (a diverged run) is kept as unknown, never a 500 later on.
    r = coord.post("/workers/w0/heartbeat", content='{"loss": NaN, "step": 8}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert coord.get("/workers").json()[0]["step"] == 8
    assert coord.delete("/workers/w0").status_code == 200
    assert statuses(coord) == {"w0": "left"}
    r = coord.post("/workers/w0/heartbeat", json={})
    assert r.status_code == 409 and "register again" in r.json()["detail"]
    assert coord.delete("/workers/ghost").status_code == 404
    register(coord, "w0")
    assert statuses(coord) == {"w0": "alive"}


def test_telemetry_round_trip_and_ring(coord):
    register(coord, "w0")
    register(coord, "w1")
    for step in range(5):
        r = coord.post("/telemetry", json={"worker_id": "w0", "step": step, "loss": 3.0 - step,
                                           "lr": 1e-3, "grad_norm": 0.5, "rank": 0,
                                           "generation": 1})
        assert r.status_code == 200
    coord.post("/telemetry", json={"worker_id": "w1", "step": 0, "loss": 9.0})
    rows = coord.get("/telemetry", params={"worker_id": "w0", "limit": 3}).json()
    assert [r["metrics"]["step"] for r in rows] == [2, 3, 4]
    assert rows[-1]["metrics"] == {"step": 4, "loss": -1.0, "lr": 1e-3, "grad_norm": 0.5,
                                   "rank": 0, "generation": 1}
    assert {r["worker_id"] for r in coord.get("/telemetry").json()} == {"w0", "w1"}
    everyone = coord.get("/telemetry", params={"worker_id": "", "limit": 100}).json()
    assert len(everyone) == 6
    # Telemetry feeds each worker's last step and loss.
    w0 = coord.get("/workers").json()[0]
    assert (w0["step"], w0["loss"]) == (4, -1.0)
    r = coord.post("/telemetry", json={"worker_id": "ghost", "step": 1})
    assert r.status_code == 404
    r = coord.post("/telemetry", json={"worker_id": "w0", "note": "text"})
    assert r.status_code == 422 and "note" in r.json()["detail"]


def test_telemetry_ring_is_bounded(tmp_path):
    from coordinator.store import Store

    store = Store(str(tmp_path / "ring.db"))
    for worker_id in ("w0", "w1"):  # telemetry is kept for known workers only
        store.upsert_worker(worker_id, ip_address="127.0.0.1", port=50000, device=None, info={},
                            now=0.0)
    for i in range(30):
        store.add_telemetry("w0", ts=float(i), metrics={"step": i}, keep=10)
    store.add_telemetry("w1", ts=0.0, metrics={"step": 0}, keep=10)
    rows = store.telemetry("w0", 100)
    assert [m["step"] for _, _, m in rows] == list(range(20, 30))
    assert len(store.telemetry("w1", 100)) == 1
    store.close()


def test_metrics_parse_and_count(coord):
    for w in ("w0", "w1", "w2"):
        register(coord, w)
    coord.delete("/workers/w2")
    for _ in range(3):
        coord.post("/workers/w0/heartbeat", json={"step": 12, "loss": 1.25})
    assert coord.get("/training/ready", params={"min_workers": 2}).json()["generation"] == 1
    r = coord.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("zerop2p_workers", (("status", "alive"),))] == 2
    assert samples[("zerop2p_workers", (("status", "left"),))] == 1
    assert samples[("zerop2p_workers", (("status", "dead"),))] == 0
    assert samples[("zerop2p_generation", ())] == 1
    assert samples[("zerop2p_generation_size", ())] == 2
    assert samples[("zerop2p_heartbeats_total", ())] == 3
    assert samples[("zerop2p_worker_loss", (("worker_id", "w0"),))] == 1.25
    assert samples[("zerop2p_worker_step", (("worker_id", "w0"),))] == 12


def test_two_apps_in_one_process_do_not_clash(tmp_path):
    s1 = Settings(db=":memory:", token=None)
    with serve(s1) as (u1, _), serve(s1) as (u2, _), client(u1) as a, client(u2) as b:
        register(a, "only-in-a")
        a.post("/workers/only-in-a/heartbeat", json={"step": 3})
        assert 'zerop2p_worker_step{worker_id="only-in-a"} 3.0' in a.get("/metrics").text
        assert 'zerop2p_workers{status="alive"} 1.0' in a.get("/metrics").text
        assert "only-in-a" not in b.get("/metrics").text
        assert 'zerop2p_workers{status="alive"} 0.0' in b.get("/metrics").text


# -- auth on every route ------------------------------------------------------------------------

ROUTES = [
    ("POST", "/workers/register", {"worker_id": "w9", "ip_address": "127.0.0.1", "port": 5}),
    ("POST", "/workers/w0/heartbeat", {}),
    ("DELETE", "/workers/w0", None),
    ("GET", "/workers", None),
    ("GET", "/training/ready?min_workers=1", None),
    ("GET", "/training/generation", None),
    ("GET", "/training/status", None),
    ("POST", "/telemetry", {"worker_id": "w0", "step": 1}),
    ("GET", "/telemetry", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_auth_on_every_route(shared, method, path, body):
    coord = shared
    url = str(coord.base_url)
    register(coord, "w0")
    before = snapshot(coord)
    for token, why in ((None, "missing credentials"), ("wrong", "wrong token")):
        with client(url, token=token) as other:
            r = other.request(method, path, json=body)
            assert r.status_code == 401, (token, r.text)
            assert why in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
    with client(url, token=None) as other:
        r = other.request(method, path, json=body, headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status_code == 401
    assert snapshot(coord) == before  # refused calls changed nothing
    r = coord.request(method, path, json=body)
    assert r.status_code == 200, r.text


def test_open_routes(coord):
    with client(str(coord.base_url), token=None) as anon:
        assert anon.get("/healthz").json() == {"ok": True}
        page = anon.get("/")
        assert page.status_code == 200 and "zerop2p coordinator" in page.text
        assert "w0" not in page.text  # the page holds no data; its script reads with a token


# -- bad input ----------------------------------------------------------------------------------

GOOD = {"worker_id": "w1", "ip_address": "127.0.0.1", "port": 50000}
BAD_INPUT = [
    ("malformed json", "POST", "/workers/register", b'{"worker_id": "w1", "port": 5', 422,
     "body"),
    ("json list", "POST", "/workers/register", json.dumps([GOOD]).encode(), 422, "body"),
    ("missing worker_id", "POST", "/workers/register",
     {"ip_address": "127.0.0.1", "port": 1}, 422, "worker_id"),
    ("missing port", "POST", "/workers/register", {**GOOD, "port": None}, 422, "port"),
    ("port -1", "POST", "/workers/register", {**GOOD, "port": -1}, 422, "port"),
    ("port 0", "POST", "/workers/register", {**GOOD, "port": 0}, 422, "port"),
    ("port 70000", "POST", "/workers/register", {**GOOD, "port": 70000}, 422, "port"),
    ("port as text", "POST", "/workers/register", {**GOOD, "port": "http"}, 422, "port"),
    ("id with newline", "POST", "/workers/register", {**GOOD, "worker_id": "w\n1"}, 422,
     "worker_id"),
    ("id with NUL", "POST", "/workers/register", {**GOOD, "worker_id": "w\x001"}, 422,
     "worker_id"),
    ("id too long", "POST", "/workers/register", {**GOOD, "worker_id": "w" * 129}, 422,
     "worker_id"),
    ("empty id", "POST", "/workers/register", {**GOOD, "worker_id": ""}, 422, "worker_id"),
    ("empty address", "POST", "/workers/register", {**GOOD, "ip_address": ""}, 422,
     "ip_address"),
    ("negative ram", "POST", "/workers/register", {**GOOD, "ram_gb": -1}, 422, "ram_gb"),
    ("nested extra", "POST", "/workers/register", {**GOOD, "labels": {"a": 1}}, 422, "labels"),
    ("200 KB body", "POST", "/workers/register", {**GOOD, "pad": "x" * 200_000}, 413, "body"),
    ("negative step", "POST", "/workers/w0/heartbeat", {"step": -3}, 422, "step"),
    ("phase as object", "POST", "/workers/w0/heartbeat", {"phase": {"x": 1}}, 422, "phase"),
    ("id with newline in path", "POST", "/workers/w%0A0/heartbeat", {}, 422, "worker_id"),
    ("delete id with control char", "DELETE", "/workers/w%070", None, 422, "worker_id"),
    ("min_workers 0", "GET", "/training/ready?min_workers=0", None, 422, "min_workers"),
    ("min_workers missing", "GET", "/training/ready", None, 422, "min_workers"),
    ("wait negative", "GET", "/training/ready?min_workers=1&wait=-1", None, 422, "wait"),
    ("wait text", "GET", "/training/ready?min_workers=1&wait=soon", None, 422, "wait"),
    ("telemetry no id", "POST", "/telemetry", {"step": 1}, 422, "worker_id"),
    ("telemetry text metric", "POST", "/telemetry", {"worker_id": "w0", "loss": "low"}, 422,
     "loss"),
    ("telemetry limit 0", "GET", "/telemetry?limit=0", None, 422, "limit"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "field"),
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_refused_naming_the_field(shared, method, path, body, status, field):
    coord = shared
    register(coord, "w0", port=50000)
    coord.post("/telemetry", json={"worker_id": "w0", "step": 1})
    before = snapshot(coord)
    if isinstance(body, bytes):
        r = coord.request(method, path, content=body,
                          headers={"content-type": "application/json"})
    else:
        r = coord.request(method, path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and field in detail, detail
    assert snapshot(coord) == before


def test_chunked_oversize_body_is_refused(coord):
    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    r = coord.post("/workers/register", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["detail"]
    assert coord.get("/workers").json() == []


def test_validation_handler_shape(coord):
    r = coord.post("/workers/register", json={"ip_address": "x"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("worker_id: Field required") and "port: Field required" in detail
    with pytest.raises(httpx.HTTPStatusError):
        register(coord, "w\t")
