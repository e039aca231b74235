"""``zerop2p train``'s progress: read from the coordinator while the workers' output is piped."""

from __future__ import annotations

import re

import pytest

from worker.cluster.launcher import run_local_cluster
from worker.cluster.progress import Snapshot, describe, snapshot

STEPS = 40
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--micro-batch-rows", "4", "--seq-len",
        "32", "--max-tokens", "60000", "--schedule", "constant"]
LINE = re.compile(r"step (\d+)/40 loss (\d+\.\d{4}) tokens/s (\d+) ETA (\d+m\d\ds|-)")


def test_snapshot_waits_for_every_alive_worker():
    rows = [{"status": "alive", "step": 4, "loss": 2.0, "tokens_per_s": 100.0},
            {"status": "alive", "step": None}, {"status": "dead", "step": 9}]
    assert snapshot(rows) is None  # one alive worker has not reported yet
    rows[1].update(step=6, loss=4.0, tokens_per_s=50.0)
    assert snapshot(rows) == Snapshot(steps_done=5, loss=3.0, tokens_per_s=150.0)
    assert describe(Snapshot(5, 3.0, 150.0), 40, 75.0) == \
        "step 5/40 loss 3.0000 tokens/s 150 ETA 1m15s"


@pytest.mark.timeout(120)
def test_a_local_run_prints_progress_lines_from_the_coordinator(capfd):
    run_local_cluster(2, ARGS, echo=False, timeout=90, progress_steps=STEPS)
    lines = [m for m in map(LINE.search, capfd.readouterr().err.splitlines()) if m]
    assert lines, "no progress line"
    steps = [int(m.group(1)) for m in lines]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert steps[-1] >= 1 and steps[-1] <= STEPS, steps
    assert float(lines[-1].group(2)) > 0, lines[-1].group(0)
