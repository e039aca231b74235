"""The worker side against real coordinators: CoordinatorClient, HeartbeatTask, Membership."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from coordinator_helpers import TOKEN, CoordinatorProcess, client, listed_workers, statuses

from coordinator.server import bind
from worker.membership.client import CoordinatorClient, CoordinatorError, Generation, PeerInfo
from worker.membership.facade import Membership
from worker.membership.heartbeat import HeartbeatTask

pytestmark = pytest.mark.timeout(40)




def closed_port_url() -> str:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


# -- CoordinatorClient ---------------------------------------------------------------------------

async def test_clients_get_identical_generations(url):
    clients = [CoordinatorClient(url, token=TOKEN, worker_id=f"w{i}") for i in range(3)]
    try:
        for i, c in enumerate(clients):
            await c.register("127.0.0.1", 52000 + i, device="cpu", cpu_cores=2)
        gens = await asyncio.gather(*(c.wait_ready(3, timeout=10) for c in clients))
        peers = [PeerInfo(f"w{i}", "127.0.0.1", 52000 + i, i) for i in range(3)]
        assert gens == [Generation(1, i, 3, peers) for i in range(3)]
        rows = await listed_workers(clients[0].url)
        assert [(w["worker_id"], w["info"]) for w in rows] == [
            (f"w{i}", {"cpu_cores": 2}) for i in range(3)]
        await clients[1].report_telemetry(step=1, loss=2.0)
        await clients[2].leave()
        assert [w["status"] for w in await listed_workers(clients[0].url)] == ["alive", "alive", "left"]
        again = await asyncio.gather(*(c.wait_ready(2, timeout=10, after_generation=1)
                                       for c in clients[:2]))
        assert [(g.generation, g.rank, g.world_size) for g in again] == [(2, 0, 2), (2, 1, 2)]
    finally:
        for c in clients:
            await c.close()


async def test_wait_ready_times_out_naming_the_counts(url):
    c = CoordinatorClient(url, token=TOKEN, worker_id="lonely")
    try:
        await c.register("127.0.0.1", 52000)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"barrier for 3 workers .* \(1 alive"):
            await c.wait_ready(3, timeout=0.6)
        assert 0.5 < time.monotonic() - t0 < 1.5
    finally:
        await c.close()


async def test_refusals_are_not_retried_and_carry_the_message(url):
    bad = CoordinatorClient(url, token="wrong", worker_id="w0", retry_for=30)
    good = CoordinatorClient(url, token=TOKEN, worker_id="w\n0")
    try:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorError) as err:
            await bad.register("127.0.0.1", 52000)
        assert err.value.status == 401 and "wrong token" in err.value.message
        with pytest.raises(CoordinatorError) as err:
            await good.register("127.0.0.1", 52000)
        assert err.value.status == 422 and "worker_id" in err.value.message
        assert time.monotonic() - t0 < 1.0
    finally:
        await bad.close()
        await good.close()


async def test_unreachable_coordinator_fails_at_the_deadline():
    c = CoordinatorClient(closed_port_url(), worker_id="w0", retry_for=1.0, max_backoff=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorError) as err:
            await c.register("127.0.0.1", 52000)
        assert err.value.status is None and "attempts" in err.value.message
        assert 0.5 < time.monotonic() - t0 < 2.0
    finally:
        await c.close()


async def test_client_rides_out_a_coordinator_restart(tmp_path):
    """kill -9, restart on the same db and port: calls made meanwhile succeed; a coordinator
    that forgot us (:memory:) gets a fresh registration from the next heartbeat."""
    log = tmp_path / "c.log"
    first = CoordinatorProcess(db=str(tmp_path / "c.db"), log=log).start()
    c = CoordinatorClient(first.url, token=TOKEN, worker_id="w0", max_backoff=0.5, retry_for=20)
    try:
        await c.register("127.0.0.1", 52000)
        await c.heartbeat(phase="train", step=1)
        first.kill()
        pending = asyncio.ensure_future(c.heartbeat(phase="train", step=2))
        await asyncio.sleep(0.5)  # the heartbeat is now retrying against a closed port
        assert not pending.done()
        second = CoordinatorProcess(db=str(tmp_path / "c.db"), port=first.port, log=log)
        await asyncio.to_thread(second.start)
        try:
            t0 = time.monotonic()
            await asyncio.wait_for(pending, 10)
            assert time.monotonic() - t0 < 3.0
            assert [(w["worker_id"], w["status"], w["step"]) for w in await listed_workers(c.url)] == [
                ("w0", "alive", 2)]
        finally:
            second.kill()
        third = CoordinatorProcess(db=":memory:", port=first.port, log=log)
        await asyncio.to_thread(third.start)
        try:
            await c.heartbeat(step=3)  # 404: re-registers, then heartbeats
            assert [(w["worker_id"], w["status"], w["port"], w["step"])
                    for w in await listed_workers(c.url)] == [("w0", "alive", 52000, 3)]
        finally:
            third.kill()
    finally:
        await c.close()
        first.kill()


async def test_barrier_wait_keeps_its_deadline_across_a_coordinator_restart(tmp_path):
    """A poll retried once the coordinator is back asks to be held for the time left, not for
    the first poll's wait, so the barrier times out on time (it ran a whole poll late before)."""
    log = tmp_path / "c.log"
    first = CoordinatorProcess(db=str(tmp_path / "c.db"), log=log).start()
    c = CoordinatorClient(first.url, token=TOKEN, worker_id="w0", max_backoff=0.2)
    try:
        await c.register("127.0.0.1", 52000)
        first.kill()
        t0 = time.monotonic()
        waiting = asyncio.ensure_future(c.wait_ready(2, timeout=5.0))  # one worker: never met
        await asyncio.sleep(0.5)
        second = CoordinatorProcess(db=str(tmp_path / "c.db"), port=first.port, log=log)
        await asyncio.to_thread(second.start)
        try:
            with pytest.raises(TimeoutError, match=r"barrier for 2 workers .* \(1 alive"):
                await asyncio.wait_for(waiting, 30)
            assert time.monotonic() - t0 < 6.0
        finally:
            second.kill()
    finally:
        await c.close()
        first.kill()


# -- HeartbeatTask -------------------------------------------------------------------------------

async def test_heartbeat_task_keeps_a_worker_alive_and_stops_at_once(fast_url):
    c = CoordinatorClient(fast_url, token=TOKEN, worker_id="w0")
    task = HeartbeatTask(c, interval=0.2)
    try:
        await c.register("127.0.0.1", 52000)
        task.update(phase="train", step=5)
        task.start()
        await asyncio.sleep(1.6)  # well past the heartbeat timeout
        rows = await listed_workers(c.url)
        assert [(w["status"], w["phase"], w["step"]) for w in rows] == [("alive", "train", 5)]
        assert 5 <= task.sent <= 11  # every 0.2 s, ±10%
        t0 = time.monotonic()
        await task.stop()
        assert time.monotonic() - t0 < 0.1
        sent = task.sent
        await asyncio.sleep(1.3)
        assert task.sent == sent
        assert [w["status"] for w in await listed_workers(c.url)] == ["dead"]
    finally:
        await task.stop()
        await c.close()


async def test_heartbeat_task_survives_an_absent_coordinator():
    c = CoordinatorClient(closed_port_url(), worker_id="w0", retry_for=0.0)
    task = HeartbeatTask(c, interval=0.05)
    task.start()
    await asyncio.sleep(0.4)
    assert task._task is not None and not task._task.done()  # still beating, not crashed
    await task.stop()
    await c.close()


# -- Membership (the synchronous facade) ---------------------------------------------------------

def test_three_memberships_join_one_generation(url):
    def member(i):
        return Membership(url, token=TOKEN, worker_id=f"w{i}", ip_address="127.0.0.1",
                          port=53000 + i, heartbeat_interval=0.2, cpu_cores=4)

    ms = [member(i) for i in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            gens = list(pool.map(lambda m: m.join(3, timeout=10), ms))
        assert {g.generation for g in gens} == {1} and {g.world_size for g in gens} == {3}
        assert all(g.peers == gens[0].peers for g in gens)
        assert sorted(g.rank for g in gens) == [0, 1, 2]
        assert all(g.peers[g.rank] == PeerInfo(f"w{i}", "127.0.0.1", 53000 + i, g.rank)
                   for i, g in enumerate(gens))
        with client(url) as http:  # ranks follow registration order (the threads raced)
            order = [w["worker_id"] for w in http.get("/workers").json()]
        assert [p.worker_id for p in gens[0].peers] == order

        ms[1].update_status(phase="train", step=4, loss=1.5)
        for step in range(3):
            ms[1].report(step=step, loss=2.0 - step, rank=1, generation=1)
        with client(url) as http:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the next heartbeat carries the status
                w1 = {w["worker_id"]: w for w in http.get("/workers").json()}["w1"]
                rows = http.get("/telemetry", params={"worker_id": "w1"}).json()
                if w1["phase"] == "train" and len(rows) == 3:
                    break
                time.sleep(0.05)
            assert (w1["phase"], w1["step"], w1["loss"]) == ("train", 4, 1.5)
            assert sorted(r["metrics"]["step"] for r in rows) == [0, 1, 2]

        # w2 leaves: generation 1 ends; the others rejoin generation 2 as ranks 0 and 1.
        ms[2].leave()
        with ThreadPoolExecutor(2) as pool:
            again = list(pool.map(lambda m: m.rejoin(2, timeout=10), ms[:2]))
        assert {(g.generation, g.world_size) for g in again} == {(2, 2)}
        assert sorted(g.rank for g in again) == [0, 1]
        assert again[0].peers == again[1].peers
        with client(url) as http:
            assert statuses(http) == {"w0": "alive", "w1": "alive", "w2": "left"}
    finally:
        for m in ms:
            m.close()


def test_rejoin_after_a_failure_nobody_died_of(url):
    ms = [Membership(url, token=TOKEN, worker_id=f"w{i}", ip_address="127.0.0.1",
                     port=53000 + i, heartbeat_interval=0.5) for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            assert [g.generation for g in pool.map(lambda m: m.join(2, timeout=10), ms)] == [1, 1]
            again = list(pool.map(lambda m: m.rejoin(2, timeout=10), ms))
        assert [g.generation for g in again] == [2, 2]
        assert sorted(g.rank for g in again) == [0, 1] and again[0].peers == again[1].peers
        assert ms[0].generation == 2
    finally:
        for m in ms:
            m.close()


def test_membership_join_timeout_and_prompt_idempotent_close(url):
    m = Membership(url, token=TOKEN, worker_id="solo", ip_address="127.0.0.1", port=53000,
                   heartbeat_interval=5.0)
    with pytest.raises(TimeoutError, match="barrier for 2 workers"):
        m.join(2, timeout=0.5)
    threads_before = threading.active_count()
    t0 = time.monotonic()
    m.close()
    assert time.monotonic() - t0 < 1.0  # the 5 s heartbeat wait is cut short
    assert threading.active_count() == threads_before - 1
    m.close()
    m.report(step=1)  # after close: a no-op, never an exception
    m.update_status(step=1)
    with pytest.raises(RuntimeError, match="closed"):
        m.join(1, timeout=1)


def test_join_and_leave_name_an_unreachable_coordinator_within_their_own_deadline():
    """The client's error (the URL, the attempts, the connection problem) comes out, not the
    facade's generic timeout, and within the join timeout rather than the client's retry window."""
    url = closed_port_url()
    m = Membership(url, worker_id="w0", ip_address="127.0.0.1", port=53000,
                   request_timeout=1.0)  # leave's retry window: one request timeout
    try:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorError, match="attempts") as err:
            m.join(1, timeout=1.0)
        assert url in err.value.message and time.monotonic() - t0 < 2.5
        t0 = time.monotonic()
        with pytest.raises(CoordinatorError, match="DELETE .* attempts"):
            m.leave()
        assert time.monotonic() - t0 < 2.5
    finally:
        m.close()


def test_report_never_blocks_when_the_coordinator_is_gone():
    m = Membership(closed_port_url(), worker_id="w0", ip_address="127.0.0.1", port=53000)
    try:
        t0 = time.monotonic()
        for step in range(200):
            m.report(step=step, loss=1.0)
        assert time.monotonic() - t0 < 0.5
    finally:
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 6.0
