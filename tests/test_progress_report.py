"""What a rank reports about itself: the watcher that wakes a thread blocked on a collective,
the transport's view of what it waits for and who has not sent (two real gRPC transports in
this process), its per-peer links, and the reporter's rate limit."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from communication.collectives import Key, Phase, Watcher, install, result
from communication.grpc_collectives import GrpcCollectives
from communication.grpc_transport import GrpcTransport
from worker.engine.progress import Activity, Progress
from worker.train.reporting import ProgressReporter

pytestmark = pytest.mark.timeout(60)

KEY = Key(generation=3, phase=Phase.GATHER_FORWARD, step=41, unit=7, micro_batch=0)


def test_a_blocked_wait_tells_the_watcher_and_returns_at_once():
    heard: list[tuple[Key, float]] = []
    fut: Future = Future()
    threading.Timer(0.35, fut.set_result, args=("done",)).start()
    uninstall = install(Watcher(lambda k, s: heard.append((k, s)), every=0.1))
    try:
        assert result(fut, key=KEY, rank=0, timeout=5.0) == "done"
        assert 2 <= len(heard) <= 4 and all(k == KEY for k, _ in heard), heard
        assert [s for _, s in heard] == sorted(s for _, s in heard)
        with pytest.raises(Exception, match=r"g3/s41/u7/m0/gather_fwd on rank 0: no result "
                                            r"within 0\.25s"):
            result(Future(), key=KEY, rank=0, timeout=0.25)
    finally:
        uninstall()
    heard.clear()
    done: Future = Future()
    threading.Timer(0.2, done.set_result, args=(1,)).start()
    assert result(done, key=KEY, rank=0, timeout=5.0) == 1 and heard == []  # none installed


@pytest.fixture
def pair():
    """Ranks 0 and 1 of generation 3 on two transports in this process."""
    transports = [GrpcTransport(token="t") for _ in range(2)]
    peers = [t.address for t in transports]
    colls = [GrpcCollectives.bind(t, rank=r, world_size=2, peers=peers, generation=3,
                                  timeout=20.0) for r, t in enumerate(transports)]
    yield colls
    for c, t in zip(colls, transports):
        c.close()
        t.close()


def test_the_transport_names_the_oldest_collective_and_who_has_not_sent(pair):
    rank0, rank1 = pair
    assert rank0.waiting() is None
    sent: list[dict] = []
    reporter = ProgressReporter(lambda **f: sent.append(f), rank=0, generation=3,
                                waiting=rank0.waiting, every=0.1)
    fut = rank0.all_gather(KEY, torch.arange(4.0))
    threading.Timer(0.5, lambda: rank1.all_gather(KEY, torch.arange(4.0, 8.0))).start()
    uninstall = reporter.install()
    try:
        out = result(fut, key=KEY, rank=0, timeout=10.0)
    finally:
        uninstall()
    assert torch.equal(out, torch.arange(8.0))
    assert sent, "the blocked thread reported nothing"
    waiting = sent[0]["waiting"]
    assert (waiting["key"], waiting["missing"]) == ("g3/s41/u7/m0/gather_fwd", [1])
    assert waiting["what"] == "forward all-gather of unit 7, micro-batch 0, step 41 (generation 3)"
    assert [f["waiting"]["seconds"] for f in sent] == sorted(f["waiting"]["seconds"] for f in sent)
    assert {(f["rank"], f["generation"], f["activity"]) for f in sent} == {(0, 3, "setup")}
    assert rank0.waiting() is None  # done: nothing in flight

    links = rank0.links()  # the bytes pushed to rank 1; a Ping round starts in the background
    assert [(lk.rank, lk.address) for lk in links] == [(1, rank1.transport.address)]
    assert links[0].sent_bytes > 16 and links[0].send_bytes_per_s > 0

    async def pinged():
        await asyncio.wait_for(asyncio.shield(rank0._links._probe), 5.0)
    rank0.transport.call(pinged(), timeout=10.0)
    again = rank0.links()[0]
    assert again.rtt_s is not None and 0 < again.rtt_s < 2.0
    assert again.send_bytes_per_s is None  # nothing was sent since the last look


def test_the_reporter_is_rate_limited_and_counts_idle_time():
    now = [100.0]
    sent: list[dict] = []
    reporter = ProgressReporter(lambda **f: sent.append(f), rank=2, generation=5, every=1.0,
                                clock=lambda: now[0])

    def event(activity: Activity, unit: int | None):
        reporter(Progress(activity=activity, rank=2, step=41, unit=unit, micro_batch=0))

    event(Activity.FORWARD, 1)
    now[0] += 0.4
    event(Activity.FORWARD, 2)  # within a second of the last report: not sent
    now[0] += 0.7
    event(Activity.FORWARD, 2)  # sent: same position, idle since it moved 0.7 s ago
    assert [(f["unit"], f["idle_s"]) for f in sent] == [(1, 0.0), (2, 0.7)]
    reporter.while_waiting(KEY, 4.5)  # no transport view: the key it is blocked on
    assert sent[-1]["waiting"] == {"key": str(KEY), "what": KEY.describe(), "missing": None,
                                   "seconds": 4.5}
