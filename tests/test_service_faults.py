"""The training service under faults, on real processes (tests/service_harness.py): a
coordinator SIGKILLed and restarted mid-session, a serving worker SIGKILLed mid-operation and
restarted; each session must end with the weights of an uninterrupted one, every result
posted once, and optim steps 1..N without gaps or repeats. A negative control shows the weight
check fails for a session that applied one forward_backward twice.

One cluster serves the whole module: the uninterrupted reference session runs on it first
(same seed, so the same initial weights). Bases are saved every 4 optim steps, so a 6-step
session that loses a worker after step 5's forward_backward replays steps 5 and 6 from the
step-4 base: first alone (world size 1), then again once the restarted worker is taken in.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest
from coordinator_helpers import TOKEN
from service_harness import ServiceCluster, batch, max_diff, state_weights

from zerop2p import types

STEPS = 6
BASE_EVERY = 4
ROWS, LENGTH = 32, 48  # each forward_backward takes a while: a kill lands inside one
TOLERANCE = 1e-5
RESULT_S = 120.0


def submit(training, steps, *, repeat_first: bool = False) -> list:
    """forward_backward then optim_step for each step; ``repeat_first`` posts the first
    forward_backward twice (a double application, for the negative control)."""
    futures = []
    for i, step in enumerate(steps):
        futures.append(training.forward_backward(batch(step, ROWS, LENGTH)))
        if repeat_first and i == 0:
            futures.append(training.forward_backward(batch(step, ROWS, LENGTH)))
        futures.append(training.optim_step(types.AdamParams(learning_rate=1e-2)))
    return futures


def outcome(training, results: list) -> dict:
    """What a finished session is compared on: its optim steps, its losses, its weights."""
    path = training.save_state("final").result(RESULT_S).path
    return {"steps": [r.step for r in results if isinstance(r, types.OptimStepResponse)],
            "losses": [r.metrics["loss:sum"] for r in results
                       if isinstance(r, types.ForwardBackwardOutput)],
            "weights": state_weights(path), "session": training.session_id}


def logprobs(training) -> list[float]:
    """A prompt's log-probabilities: a pure function of the session's current weights."""
    prompt = types.ModelInput.from_ints([(7 * i) % 250 + 1 for i in range(40)])
    return training.compute_logprobs(prompt).result(RESULT_S)[1:]


def new_session(cluster: ServiceCluster):
    return cluster.client().create_lora_training_client("tiny-gpt2", rank=4, seed=0)


def coordinator(cluster: ServiceCluster) -> httpx.Client:
    return httpx.Client(base_url=cluster.coordinator.url, timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN}"})


def generation(cluster: ServiceCluster) -> dict:
    with coordinator(cluster) as http:
        return http.get("/training/generation").json()


def wait_generation(cluster: ServiceCluster, done, what: str, timeout: float = 60.0) -> dict:
    """Poll GET /training/generation until ``done(answer)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = generation(cluster)
        if done(answer):
            return answer
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {timeout}s: {answer}\n{cluster.logs()}")


def posted(cluster: ServiceCluster, session: str) -> dict[int, int]:
    """How many results the coordinator recorded for each seq of ``session`` (it logs the
    first one posted for an operation, and never a later one)."""
    text = "\n".join(p.read_text() for p in sorted(cluster.tmp.glob("c.log")))
    counts: dict[int, int] = {}
    for seq in re.findall(rf"operation \d+ \({re.escape(session)} #(\d+), \w+\) done by", text):
        counts[int(seq)] = counts.get(int(seq), 0) + 1
    return counts


def worker_log(cluster: ServiceCluster, i: int) -> str:
    return (cluster.tmp / f"worker{i}.log").read_text()


def same_as_reference(got: dict, reference: dict, tolerance: float = TOLERANCE
                      ) -> tuple[float, float]:
    """Steps 1..N in order, every forward_backward's loss and the final weights as the
    uninterrupted run's within ``tolerance``; returns (weights, losses) max differences."""
    assert got["steps"] == list(range(1, STEPS + 1)), got["steps"]
    assert len(got["losses"]) == len(reference["losses"])
    losses = max(abs(a - b) for a, b in zip(got["losses"], reference["losses"]))
    assert losses <= tolerance, (got["losses"], reference["losses"])
    diff = max_diff(got["weights"], reference["weights"])
    assert diff <= tolerance, f"weights differ by {diff:.3e} from the uninterrupted run"
    return diff, losses


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = ServiceCluster(tmp_path_factory.mktemp("faults"), base_every=BASE_EVERY).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(cluster) -> dict:
    """The uninterrupted session."""
    training = new_session(cluster)
    results = [f.result(RESULT_S) for f in submit(training, range(STEPS))]
    got = outcome(training, results)
    assert got["steps"] == list(range(1, STEPS + 1))
    got["logprobs"] = logprobs(training)
    return got


@pytest.mark.timeout(150)
def test_coordinator_sigkill_and_restart_mid_session(cluster, reference):
    first = generation(cluster)
    training = new_session(cluster)

    # 1. Killed with six operations just submitted: the workers are inside them (their
    # results' POSTs fail) and the client's long-poll for them is in flight.
    futures = submit(training, range(3))
    results: list = []
    waiter = threading.Thread(target=lambda: results.extend(f.result(RESULT_S) for f in futures))
    waiter.start()
    time.sleep(0.1)
    with coordinator(cluster) as http:
        last = http.get(f"/service/sessions/{training.session_id}/ops/6").json()["status"]
    assert last in ("queued", "running"), "too late: the waiter got every result already"
    cluster.restart_coordinator()
    waiter.join(RESULT_S)
    assert len(results) == 6, cluster.logs()

    # 2. Killed while the workers are idle inside GET /service/next; the client submits the
    # next steps while it is down (its POSTs retry with backoff).
    time.sleep(1.0)
    port = cluster.coordinator.port
    cluster.coordinator.kill()
    later: list = []
    poster = threading.Thread(target=lambda: later.extend(submit(training, range(3, 5))))
    poster.start()
    time.sleep(1.0)
    assert poster.is_alive()  # its first POST is still being retried
    cluster.restart_coordinator()  # nothing to kill: starts on the same port and SQLite file
    assert cluster.coordinator.port == port
    poster.join(RESULT_S)
    assert len(later) == 4, cluster.logs()
    results += [f.result(RESULT_S) for f in later]

    # 3. The rest without faults.
    results += [f.result(RESULT_S) for f in submit(training, range(5, STEPS))]
    got = outcome(training, results)
    diff, losses = same_as_reference(got, reference)
    assert diff == losses == 0.0, f"the same world size and order should be bit-equal: " \
                                  f"{diff:.3e}, {losses:.3e}"
    assert all(n == 1 for n in posted(cluster, got["session"]).values())
    assert sorted(posted(cluster, got["session"])) == list(range(2 * STEPS + 2))  # + create, save
    after = generation(cluster)
    assert after["generation"] == first["generation"], "the workers re-formed instead of " \
                                                       f"riding the restarts out:\n{cluster.logs()}"
    print(f"coordinator restarted twice; generation {after['generation']} throughout; "
          f"weights vs the uninterrupted run {diff:.2e}")


@pytest.mark.timeout(60)
def test_a_forward_backward_applied_twice_is_caught(cluster, reference):
    """Negative control: the same forward_backward body at two seqs (what a replay that ran a
    finished operation on weights that already had it would do) moves the weights far more
    than the tolerance, although every optim step still counts 1..N."""
    training = new_session(cluster)
    results = [f.result(RESULT_S) for f in submit(training, range(STEPS), repeat_first=True)]
    got = outcome(training, results)
    assert got["steps"] == list(range(1, STEPS + 1))
    diff = max_diff(got["weights"], reference["weights"])
    assert diff > 10 * TOLERANCE, f"a double application moved the weights by only {diff:.3e}"
    print(f"one forward_backward applied twice: weights {diff:.2e} from the uninterrupted run")


@pytest.mark.timeout(150)
def test_worker_sigkill_mid_operation_and_restart(cluster, reference):
    first = generation(cluster)
    assert len(first["workers"]) == 2
    poster = next(w["worker_id"] for w in first["workers"] if w["rank"] == 0)
    victim = int(poster.rsplit("-", 1)[1])  # rank 0: the one that posts results
    survivor = 1 - victim
    training = new_session(cluster)
    futures = submit(training, range(STEPS))
    # Kill rank 0 as soon as the group takes step 6's forward_backward (seq 11): the step-4
    # base (seq 8) is saved, seqs 9 and 10 are answered, seq 11 is running, its result not
    # posted, and seq 12 is queued.
    ops = f"/service/sessions/{training.session_id}/ops"
    with coordinator(cluster) as http:
        while (status := http.get(f"{ops}/11").json()["status"]) == "queued":
            time.sleep(0.002)
        cluster.workers[victim].send_signal(signal.SIGKILL)
        cluster.workers[victim].wait(10)
        at_kill = [http.get(f"{ops}/{seq}").json()["status"] for seq in (8, 9, 10, 11, 12)]
    assert status == "running" and at_kill == ["done"] * 3 + ["running", "queued"], at_kill

    # The survivor re-forms alone, replays from the base and answers; then the restarted
    # worker is taken in and the pair replays again.
    alone = wait_generation(cluster, lambda g: g["generation"] not in (None, first["generation"])
                            and len(g["workers"]) == 1, "generation of the survivor alone")
    results = [f.result(RESULT_S) for f in futures]
    # The weights the survivor reached alone (steps 5 and 6 at world size 1), before the
    # victim comes back: the same within float reordering.
    alone_logprobs = max(abs(a - b) for a, b in zip(logprobs(training), reference["logprobs"]))
    assert alone_logprobs <= TOLERANCE
    assert generation(cluster)["generation"] == alone["generation"]
    cluster.start_worker(victim)
    pair = wait_generation(cluster, lambda g: g["generation"] not in (None, alone["generation"])
                           and len(g["workers"]) == 2, "generation with the restarted worker")
    got = outcome(training, results)  # saved by the re-formed pair, after its replay
    diff, losses = same_as_reference(got, reference)

    counts = posted(cluster, got["session"])  # + create, compute_logprobs and save_state
    assert sorted(counts) == list(range(2 * STEPS + 3)) and set(counts.values()) == {1}, counts
    kept, back = worker_log(cluster, survivor), worker_log(cluster, victim)
    lost = re.findall(rf"generation {first['generation']} lost a peer: (\S+) on rank", kept)
    assert lost and "/" in lost[0], f"the survivor did not fail inside a collective: {lost}"
    base = f"session {got['session']} rebuilt from its base (seq 8)"
    assert kept.count(base) == 2, kept[-4000:]  # alone, then in the pair
    assert base in back.split("serving sessions under")[-1]
    session = re.escape(got["session"])
    replayed = re.findall(rf"replaying \w+ #(\d+) of {session}", kept)
    # alone: the two answered before the kill; in the pair: all four since the base
    assert replayed == ["9", "10", "9", "10", "11", "12"], replayed
    assert re.findall(rf"replaying \w+ #(\d+) of {session}", back) == ["9", "10", "11", "12"]
    print(f"generations {first['generation']} -> {alone['generation']} (alone) -> "
          f"{pair['generation']} (pair); the survivor replayed {len(replayed)} answered "
          f"operations; vs the uninterrupted run: weights {diff:.2e}, losses {losses:.2e}, "
          f"log-probabilities alone {alone_logprobs:.2e}")
