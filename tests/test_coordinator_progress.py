"""Who is stuck, at the coordinator: the stall rule on a clock the test moves, the refusals of
``POST /training/progress``, ``GET /training/status`` and the Prometheus series (parsed by
prometheus_client's own text parser) against a real uvicorn."""

from __future__ import annotations

import logging
import time

import pytest
from coordinator_helpers import client, register, serve
from prometheus_client.parser import text_string_to_metric_families

from coordinator.config import Settings
from coordinator.models import MAX_FIELDS
from coordinator.progress import ProgressBoard
from coordinator.progress_models import PEER_FIELD, ProgressRequest, peer_fields
from coordinator.service import Coordinator, Refusal
from coordinator.store import Store

pytestmark = pytest.mark.timeout(30)

KEY = "g1/s41/u3/m0/gather_fwd"
WHAT = "forward all-gather of unit 3, micro-batch 0, step 41 (generation 1)"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def board():
    """Three registered workers frozen into generation 1 (ranks 0-2), a board on a test clock."""
    store = Store(":memory:")
    coord = Coordinator(store, heartbeat_timeout=30.0)
    for i in range(3):
        coord.register(f"w{i}", ip_address="10.0.0.5", port=7000 + i, device="cpu", info={})
    assert coord.form_generation(3).generation == 1
    clock = Clock()
    yield ProgressBoard(store, stall_after=3.0, clock=clock), clock
    store.close()


def report(board: ProgressBoard, rank: int, *, missing=None, waited: float = 0.0, **fields):
    body = {"worker_id": f"w{rank}", "generation": 1, "rank": rank, "activity": "forward",
            "step": 41, "unit": 3, "micro_batch": 0, **fields}
    if missing is not None:
        body["waiting"] = {"key": KEY, "what": WHAT, "missing": missing, "seconds": waited}
    board.record(ProgressRequest(**body))


def test_a_silent_rank_is_named_with_the_key_it_owes_and_who_waits(board, caplog):
    board, clock = board
    for r in range(3):
        report(board, r)
    status = board.status("default")
    assert status.stalled == [] and not any(r.stalled for r in status.ranks)
    assert status.sentence == "no rank is stalled: 3 ranks training, at step 41"
    assert board.check() == pytest.approx(clock.now + 3.0)  # the next moment one could stall

    clock.now += 2.0  # rank 2 stays silent; 0 and 1 wait on it and keep reporting
    report(board, 0, missing=[2], waited=1.5)
    report(board, 1, missing=[2], waited=1.2)
    clock.now += 1.5
    report(board, 0, missing=[2], waited=3.0)
    report(board, 1, missing=[2], waited=2.7)
    clock.now += 0.5
    status = board.status("default")
    assert [s.rank for s in status.stalled] == [2]
    stalled = status.stalled[0]
    assert (stalled.worker_id, stalled.address, stalled.waiting_ranks) == (
        "w2", "10.0.0.5:7002", [0, 1])
    assert stalled.owes.key == KEY and stalled.owes.seconds == pytest.approx(3.5)
    assert stalled.silent_s == pytest.approx(4.0)
    assert status.sentence == (f"rank 2 (w2 at 10.0.0.5:7002) has sent nothing for {WHAT} for "
                               "3.5 s; ranks 0, 1 are waiting on it")
    rank0 = status.ranks[0]
    assert (rank0.stalled, rank0.waiting.missing, rank0.silent_s) == (False, [2], 0.5)
    with caplog.at_level(logging.INFO, logger="coordinator.progress"):
        board.check()
        board.check()  # logged once, not at every tick
        report(board, 2)  # it reports again
        board.check()
    stalls = [r.message for r in caplog.records if "has sent nothing" in r.message]
    assert stalls == [f"site default: {status.sentence}"]
    assert any("rank 2 (w2 at 10.0.0.5:7002) reports again" in r.message for r in caplog.records)
    assert board.status("default").stalled == []


def test_nobody_is_named_when_every_rank_is_silent_or_none_waits(board):
    board, clock = board
    for r in range(3):
        report(board, r)
    clock.now += 10.0  # everyone silent: the coordinator cannot tell who is to blame
    assert board.status("default").stalled == []
    report(board, 0)
    report(board, 1)
    status = board.status("default")  # 2 is silent while others report, though none waits yet
    assert [s.rank for s in status.stalled] == [2] and status.stalled[0].owes is None
    assert status.sentence == ("rank 2 (w2 at 10.0.0.5:7002) has reported nothing for 10 s "
                               "(last: forward of unit 3, micro-batch 0, step 41); no rank is "
                               "waiting on it yet")


def test_a_wait_that_lasts_is_told_even_when_nobody_is_silent(board):
    board, clock = board
    report(board, 0, missing=[2], waited=40.0)
    report(board, 1, missing=[0], waited=2.0)
    report(board, 2, missing=[0, 1], waited=39.0)
    status = board.status("default")
    assert status.stalled == []
    assert status.sentence == (f"no rank is stalled, but rank 0 (w0 at 10.0.0.5:7000) has "
                               f"waited 40 s for {WHAT} from rank 2")


def test_reports_from_outside_the_active_generation_are_refused(board):
    board, _ = board
    with pytest.raises(Refusal) as err:
        report(board, 0, worker_id="ghost")
    assert err.value.status == 404 and "ghost" in err.value.message
    with pytest.raises(Refusal) as err:
        report(board, 1, worker_id="w0")
    assert err.value.status == 409
    assert err.value.message == ("w0 is not rank 1 of generation 1 in site default (active: "
                                 "generation 1, where it is rank 0)")
    with pytest.raises(Refusal) as err:
        report(board, 0, generation=7)
    assert err.value.status == 409 and "generation 7" in err.value.message
    assert board.status("other").sentence == "no generation is active in site other"


def test_peer_fields_fit_one_body_slowest_first():
    class Link:
        def __init__(self, rank, rtt_s, rate):
            self.rank, self.rtt_s, self.send_bytes_per_s = rank, rtt_s, rate

    links = [Link(r, r * 1e-3, 2e8 if r % 2 else None) for r in range(1, 31)]
    fields = peer_fields(links, used=12)
    assert 12 + len(fields) <= MAX_FIELDS and all(PEER_FIELD.match(f) for f in fields)
    assert fields["peer30_rtt_ms"] == 30.0 and "peer30_send_mb_s" not in fields
    assert fields["peer29_send_mb_s"] == 200.0 and "peer1_rtt_ms" not in fields  # slowest kept
    assert peer_fields([Link(1, None, None)], used=0) == {}


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_status_route_and_prometheus_series(tmp_path):
    settings = Settings(db=str(tmp_path / "c.db"), token="test-token", heartbeat_timeout=30.0,
                        stall_after=2.0)
    with serve(settings) as (url, _), client(url) as http:
        for i in range(2):
            register(http, f"w{i}", port=7000 + i)
        assert http.get("/training/ready", params={"min_workers": 2}).json()["generation"] == 1
        body = {"worker_id": "w1", "generation": 1, "rank": 1, "activity": "backward",
                "step": 5, "unit": 2, "micro_batch": 1, "idle_s": 0.2}
        assert http.post("/training/progress", json=body).status_code == 200
        assert http.post("/training/progress", json={**body, "worker_id": "w0", "rank": 0,
                                                     "activity": "forward"}).status_code == 200
        refused = http.post("/training/progress", json={**body, "rank": 0})
        assert refused.status_code == 409 and "not rank 0" in refused.json()["detail"]
        assert http.post("/training/progress", json={**body, "rank": "1"}).status_code == 422
        telemetry = {"worker_id": "w0", "step": 5, "loss": 2.5, "lr": 3e-3, "grad_norm": 0.75,
                     "tokens_per_s": 1234.0, "peer1_rtt_ms": 0.5, "peer1_send_mb_s": 250.0}
        assert http.post("/telemetry", json=telemetry).status_code == 200
        status = http.get("/training/status").json()
        assert status["generation"] == 1 and status["stall_after"] == 2.0
        assert [(r["rank"], r["activity"], r["stalled"]) for r in status["ranks"]] == [
            (0, "forward", False), (1, "backward", False)]
        assert status["stalled"] == [] and status["sentence"].startswith("no rank is stalled")
        got = samples(http.get("/metrics").text)
        assert got[("zerop2p_worker_tokens_per_second", (("worker_id", "w0"),))] == 1234.0
        assert got[("zerop2p_worker_learning_rate", (("worker_id", "w0"),))] == 3e-3
        assert got[("zerop2p_worker_grad_norm", (("worker_id", "w0"),))] == 0.75
        peer = (("peer_rank", "1"), ("worker_id", "w0"))
        assert got[("zerop2p_peer_rtt_seconds", peer)] == pytest.approx(5e-4)
        assert got[("zerop2p_peer_send_bytes_per_second", peer)] == pytest.approx(2.5e8)
        assert got[("zerop2p_stalled_ranks", (("site", "default"),))] == 0
        w0 = (("rank", "0"), ("site", "default"), ("worker_id", "w0"))
        assert got[("zerop2p_rank_stalled", w0)] == 0

        time.sleep(2.1)  # w0 falls silent past stall_after while w1 reports
        assert http.post("/training/progress", json=body).status_code == 200
        status = http.get("/training/status").json()
        assert [s["rank"] for s in status["stalled"]] == [0], status
        assert status["sentence"].startswith("rank 0 (w0 at 127.0.0.1:7000) has reported nothing")
        got = samples(http.get("/metrics").text)
        assert got[("zerop2p_stalled_ranks", (("site", "default"),))] == 1
        assert got[("zerop2p_rank_stalled", w0)] == 1
        assert got[("zerop2p_rank_silent_seconds", w0)] >= 2.0
