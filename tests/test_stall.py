"""Who is stuck, proven with real processes: a coordinator and three tiny-gpt2 workers train;
one worker is stopped with SIGSTOP mid-run. Within twice the stall threshold the coordinator's
``GET /training/status`` names that rank, the collective it owes and the ranks waiting on it,
and Prometheus shows it stalled; before the stop it names nobody (the negative control). After
SIGCONT the run finishes in the same generation: the collective deadline (120 s by default) and
the heartbeat timeout (60 s here) both outlast the stop."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.cluster.launcher import (
    kill_all,
    local_worker_env,
    spawn,
    start_coordinator,
    supervise,
    token_env,
    worker_argv,
)

TOKEN = "stall-token"
STALL_AFTER = 3.0
WORLD = 3
STEPS = 100  # ~10 steps a second here: the stop lands well before the end
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--micro-batch-rows", "6", "--seq-len",
        "32", "--max-tokens", "60000", "--schedule", "constant", "--lr", "3e-3",
        "--heartbeat-interval", "0.5", "--eval-every", "50"]


def until(what: str, check: Callable[[], object], timeout: float, every: float = 0.1):
    """``check()``'s first truthy answer, looked at every ``every`` s (the test watches the
    coordinator from outside, as an operator would); AssertionError naming ``what`` after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:.0f} s")
        time.sleep(every)


def series(http: httpx.Client) -> dict:
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.timeout(150)
def test_a_stopped_worker_is_named_with_the_key_it_owes_and_the_run_finishes(tmp_path):
    coordinator, url = start_coordinator(token=TOKEN, echo=False, heartbeat_timeout=60.0,
                                         stall_after=STALL_AFTER)
    env = {**local_worker_env(WORLD), **token_env(TOKEN)}
    workers = [spawn(f"w{i}", worker_argv(url, worker_id=f"w{i}", min_workers=WORLD,
                                          extra=ARGS + ["--output", str(tmp_path)]),
                     env=env, echo=False)[0] for i in range(WORLD)]
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    began = time.monotonic()
    try:
        def status() -> dict:
            return http.get("/training/status").json()

        def training() -> dict | None:
            s = status()
            steps = [r["step"] for r in s["ranks"]]
            return s if len(steps) == WORLD and all(st is not None and st >= 2 for st in steps) \
                else None

        until("every rank training past step 2", training, timeout=90)
        print(f"\ntraining after {time.monotonic() - began:.1f} s")
        # Negative control: a healthy run names nobody, however often it is asked.
        for _ in range(10):
            healthy = status()
            assert healthy["stalled"] == [], healthy
            assert healthy["sentence"].startswith("no rank is stalled: 3 ranks training"), healthy
            assert all(r["silent_s"] < STALL_AFTER for r in healthy["ranks"]), healthy
            time.sleep(0.1)
        victim = healthy["ranks"][2]
        child = next(w for w in workers if w.name == victim["worker_id"])
        assert child.proc.poll() is None, "the run ended before the stop: raise STEPS"
        child.proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            named = until("a stalled rank", lambda: (s := status())["stalled"] and s,
                          timeout=2 * STALL_AFTER + 5)
            seen_after = time.monotonic() - stopped
            owes = named["stalled"][0]["owes"]
            if owes is None:  # named as silent before the others' "waiting on it" arrived
                named = until("the key it owes", lambda: (s := status())["stalled"][0]["owes"]
                              and s, timeout=2 * STALL_AFTER)
                seen_after = time.monotonic() - stopped
            metrics = series(http)
        finally:
            child.proc.send_signal(signal.SIGCONT)
        print(f"status {seen_after:.1f} s after SIGSTOP: {named['sentence']}")
        print(json.dumps(named["stalled"], indent=1))
        assert seen_after <= 2 * STALL_AFTER, f"named after {seen_after:.1f} s"
        stalled = named["stalled"]
        assert [s["rank"] for s in stalled] == [2], named
        assert stalled[0]["worker_id"] == victim["worker_id"]
        assert stalled[0]["address"] == victim["address"]
        assert stalled[0]["waiting_ranks"] == [0, 1], named
        owes = stalled[0]["owes"]
        assert re.fullmatch(r"g1/s\d+/.+", owes["key"]) and owes["missing"] == [2], owes
        for rank in (0, 1):  # the ranks waiting on it report that very key
            waiting = named["ranks"][rank]["waiting"]
            assert waiting["missing"] == [2] and waiting["key"].startswith("g1/"), named
        assert named["sentence"].startswith(
            f"rank 2 ({victim['worker_id']} at {victim['address']}) has sent nothing for "
            f"{owes['what']} for "), named["sentence"]
        assert named["sentence"].endswith("; ranks 0, 1 are waiting on it"), named["sentence"]
        # Prometheus, read at the same moment: the stalled rank, and real workers' telemetry.
        site = ("site", "default")
        assert metrics[("zerop2p_stalled_ranks", (site,))] == 1
        for r in named["ranks"]:
            labels = (("rank", str(r["rank"])), site, ("worker_id", r["worker_id"]))
            assert metrics[("zerop2p_rank_stalled", labels)] == (r["rank"] == 2)
        for name in ("zerop2p_worker_tokens_per_second", "zerop2p_worker_learning_rate",
                     "zerop2p_worker_grad_norm"):
            assert any(k[0] == name for k in metrics), name
        rtts = [v for k, v in metrics.items() if k[0] == "zerop2p_peer_rtt_seconds"]
        assert rtts and all(0 < v < 2.0 for v in rtts), rtts
        rates = [v for k, v in metrics.items() if k[0] == "zerop2p_peer_send_bytes_per_second"]
        assert rates and all(v > 0 for v in rates), rates

        supervise(workers, timeout=120)  # SIGCONT: the run goes on and finishes
        print(f"finished {time.monotonic() - stopped:.1f} s after SIGSTOP")
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["generation"] == 1, "the stop must not have cost a generation"
        assert len(result["losses"]) == STEPS
        # The held-out loss reaches the coordinator too (the dashboard's eval curve).
        rows = http.get("/telemetry", params={"worker_id": "w0", "limit": 10_000}).json()
        evals = [r["metrics"]["eval_loss"] for r in rows if "eval_loss" in r["metrics"]]
        assert evals == [loss for _, loss in result["eval"]], (evals, result["eval"])
    finally:
        http.close()
        kill_all(workers + [coordinator])
