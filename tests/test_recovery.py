"""Surviving failures with real processes: a worker SIGKILLed at every phase of a step, and the
coordinator SIGKILLed and restarted mid-run. Training must finish by itself with the weights of
an uninterrupted run (bit-identical: same world size, resumed from per-step checkpoints)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch
from harness.fault_worker import FAULT_WORKER
from harness.faults import PHASES
from run_helpers import assert_same_weights, result

from worker.cluster.launcher import (
    kill_all,
    local_worker_env,
    run_local_cluster,
    spawn,
    start_coordinator,
    supervise,
    token_env,
    worker_argv,
)

TOKEN = "recovery-token"
STEPS = 8
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--micro-batch-rows", "4", "--seq-len", "32",
        "--max-tokens", "60000", "--schedule", "constant", "--lr", "3e-3", "--log-every", "1"]
# One fault per phase, alternating the rank killed; checkpoint_every 1 loses at most one step.
# The checkpoint of step n is written after step n-1's update, so a kill in "optimizer" at step
# 5 and one in "checkpoint" at 6 would hit both ranks at once: the last fault goes to step 7.
FAULT_STEPS = dict(zip(PHASES, (1, 2, 3, 4, 5, 7)))
FAULTS = ",".join(f"{phase}:{step}:{step % 2}" for phase, step in FAULT_STEPS.items())
LOST = re.compile(r"generation (\d+) lost a peer: (.*); rejoining")


def train(out: Path, *, env: dict | None = None, restarts: int = 0) -> list:
    ckpt = out / "ckpt"
    args = ARGS + ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--output", str(out)]
    return run_local_cluster(2, args, token=TOKEN, echo=False, timeout=400, max_restarts=restarts,
                             worker_env=env, worker_entry=FAULT_WORKER)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    train(out)
    return result(out)


@pytest.mark.timeout(420)
def test_kill_at_every_phase_resumes_to_the_uninterrupted_weights(tmp_path, baseline):
    mark = tmp_path / "fired"
    workers = train(tmp_path, env={"ZEROP2P_FAULT": FAULTS, "ZEROP2P_FAULT_MARK": str(mark)},
                    restarts=len(PHASES))
    fired = sorted(p.name for p in tmp_path.glob("fired.*"))
    assert fired == [f"fired.{i}" for i in range(len(PHASES))], f"faults that fired: {fired}"
    # Every survivor stopped with an error naming the lost peer, then rejoined.
    errors = [m.group(2) for w in workers for line in w.lines if (m := LOST.search(line))]
    assert len(errors) >= len(PHASES), errors
    assert all(re.search(r"rank \d at 127\.0\.0\.1:\d+", e) for e in errors), errors
    res, weights = result(tmp_path)
    ref_res, ref_weights = baseline
    assert res["losses"] == ref_res["losses"]
    assert res["generation"] > len(PHASES), "every fault should have needed a new generation"
    assert_same_weights(weights, ref_weights)


@pytest.mark.timeout(300)
def test_coordinator_killed_and_restarted_mid_run(tmp_path, baseline):
    db = str(tmp_path / "coordinator.db")
    coordinator, url = start_coordinator(token=TOKEN, db=db, echo=False)
    port = urlparse(url).port
    headers = {"Authorization": f"Bearer {TOKEN}"}
    args = ARGS + ["--output", str(tmp_path), "--heartbeat-interval", "0.5"]
    workers = [spawn(f"w{i}", worker_argv(url, worker_id=f"w{i}", min_workers=2, extra=args),
                     env={**local_worker_env(2), **token_env(TOKEN)}, echo=False)[0]
               for i in range(2)]
    try:
        ready = httpx.get(f"{url}/training/ready", params={"min_workers": 2, "wait": 60},
                          headers=headers, timeout=90).json()
        assert ready["ready"] and ready["generation"] == 1, ready
        coordinator.proc.send_signal(signal.SIGKILL)
        coordinator.proc.wait(timeout=10)
        time.sleep(2.0)  # the coordinator stays down for a while; workers keep training
        coordinator, _ = start_coordinator(token=TOKEN, db=db, echo=False, port=port)
        supervise(workers, timeout=240)
        listed = httpx.get(f"{url}/workers", headers=headers, timeout=10).json()
        telemetry = httpx.get(f"{url}/telemetry", params={"limit": 1000}, headers=headers,
                              timeout=10).json()
    finally:
        kill_all(workers + [coordinator])
    statuses = {w["worker_id"]: w["status"] for w in listed}
    assert statuses == {"w0": "left", "w1": "left"}, listed
    res, weights = result(tmp_path)
    # Per-step telemetry reached the coordinator (rows sent while it was down may be dropped).
    for wid in ("w0", "w1"):
        rows = [t["metrics"] for t in telemetry if t["worker_id"] == wid]
        assert rows, f"no telemetry from {wid}"
        assert all(r["loss"] == pytest.approx(res["losses"][int(r["step"])]) for r in rows), rows
    assert res["generation"] == 1, "training should not have restarted"
    assert res["losses"] == baseline[0]["losses"]
    assert all(torch.equal(weights[k], v) for k, v in baseline[1].items())
    assert_same_weights(weights, baseline[1])


@pytest.mark.timeout(180)
def test_ctrl_c_leaves_and_ends_the_generation(tmp_path):
    coordinator, url = start_coordinator(token=TOKEN, echo=False)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    args = [a if a != str(STEPS) else "500" for a in ARGS]
    workers = [spawn(f"w{i}", worker_argv(url, worker_id=f"w{i}", min_workers=2, extra=args),
                     env={**local_worker_env(2), **token_env(TOKEN)}, echo=False)[0]
               for i in range(2)]
    try:
        ready = httpx.get(f"{url}/training/ready", params={"min_workers": 2, "wait": 60},
                          headers=headers, timeout=90).json()
        assert ready["ready"], ready
        workers[0].proc.send_signal(signal.SIGINT)
        assert workers[0].proc.wait(timeout=30) == 130, "\n".join(workers[0].lines[-20:])
        statuses = {w["worker_id"]: w["status"]
                    for w in httpx.get(f"{url}/workers", headers=headers, timeout=10).json()}
        assert statuses["w0"] == "left", statuses
        # the generation ended with the leave: the next one holds the live worker only
        nxt = httpx.get(f"{url}/training/ready", params={"min_workers": 1, "wait": 60,
                                                        "after": ready["generation"]},
                        headers=headers, timeout=90).json()
        assert nxt["generation"] > ready["generation"]
        assert [w["worker_id"] for w in nxt["workers"]] == ["w1"], nxt
    finally:
        kill_all(workers + [coordinator])
