"""Recovery under mutual TLS, with real processes: a worker SIGKILLed mid-step is restarted
under its id, enrols again with the identity it kept (key, certificate and credential in its
identity directory: a new identity would be refused with 409), the group re-forms over TLS and
resumes from the checkpoint, and the final weights equal the uninterrupted plain run's, bit for
bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness.fault_worker import FAULT_WORKER
from run_helpers import assert_same_weights, result

from worker.cluster.launcher import run_local_cluster

TOKEN = "tls-recovery-token"
STEPS = 4
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--micro-batch-rows", "4", "--seq-len", "32",
        "--max-tokens", "20000", "--schedule", "constant", "--lr", "3e-3", "--log-every", "1"]
FAULT = "backward:2:1"  # rank 1 dies in step 2's backward: one step lost, redone from the ckpt
LOST = re.compile(r"generation (\d+) lost a peer: (.*); rejoining")


def train(out: Path, *, tls_dir: Path | None = None, env: dict | None = None,
          restarts: int = 0) -> list:
    args = ARGS + ["--checkpoint-dir", str(out / "ckpt"), "--checkpoint-every", "1",
                   "--output", str(out)]
    return run_local_cluster(2, args, token=TOKEN, echo=False, timeout=80, max_restarts=restarts,
                             worker_env=env, worker_entry=FAULT_WORKER,
                             tls_dir=None if tls_dir is None else str(tls_dir))


@pytest.mark.timeout(150)
def test_a_worker_killed_under_tls_rejoins_as_itself_and_ends_with_the_plain_weights(tmp_path):
    plain, secure, tls = tmp_path / "plain", tmp_path / "tls", tmp_path / "ca"
    train(plain)
    mark = tmp_path / "fired"
    workers = train(secure, tls_dir=tls, restarts=1,
                    env={"ZEROP2P_FAULT": FAULT, "ZEROP2P_FAULT_MARK": str(mark)})
    assert (tmp_path / "fired.0").exists(), "the fault did not fire"
    # rank 1 is whichever worker the generation put there: tell them apart by the kill
    killed, survivor = sorted(workers, key=lambda w: not any(
        "fault injection: SIGKILL" in line for line in w.lines))
    assert any("fault injection: SIGKILL" in line for line in killed.lines)
    assert any(LOST.search(line) for line in survivor.lines), "the survivor never lost its peer"
    # The killed one started twice (its lines are kept across the restart), over TLS both
    # times, and registered as itself again: with the credential it kept, or the coordinator
    # would have refused its id (409) and the run would have failed.
    assert sum("peer server listening" in line and "(TLS)" in line
               for line in killed.lines) == 2, killed.lines[-30:]
    assert not any("409" in line for line in killed.lines)
    kept = tls / killed.name
    assert {p.name for p in kept.iterdir()} >= {"key.pem", "cert.pem", "credential"}
    (res, weights), (ref, ref_weights) = result(secure), result(plain)
    assert res["generation"] >= 2, "the kill should have needed a new generation"
    assert res["losses"] == ref["losses"]
    assert_same_weights(weights, ref_weights)
