"""``--log-dir`` on a real two-worker run: rank 0's steps.jsonl and TensorBoard scalars hold
every step, with the losses the run reported and the bytes its transport pushed."""

from __future__ import annotations

import json

import pytest

from worker.cluster.launcher import run_local_cluster

STEPS = 3
ARGS = ["--model", "tiny-gpt2", "--steps", str(STEPS), "--max-tokens", "20000", "--seq-len",
        "32", "--micro-batch-rows", "4"]


@pytest.mark.timeout(240)
def test_every_step_lands_in_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs, out = tmp_path / "logs", tmp_path / "out"
    run_local_cluster(2, ARGS + ["--log-dir", str(logs), "--output", str(out)], echo=False,
                      timeout=200)
    losses = json.loads((out / "result.json").read_text())["losses"]
    records = [json.loads(line) for line in (logs / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert [r["loss"] for r in records] == losses
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    # each step gathered and reduce-scattered over gRPC: its own bytes, not the running total
    assert all(r["bytes_sent"]["gather_fwd"] > 0 and r["bytes_sent"]["reduce_scatter"] > 0
               for r in records)
    assert len({r["bytes_sent"]["gather_fwd"] for r in records}) == 1
    board = EventAccumulator(str(logs))
    board.Reload()
    assert {"train/loss", "train/lr", "train/bytes_sent"} <= set(board.Tags()["scalars"])
    scalars = board.Scalars("train/loss")
    assert [s.step for s in scalars] == list(range(STEPS))
    assert [s.value for s in scalars] == pytest.approx(losses, rel=1e-6)  # stored as float32
