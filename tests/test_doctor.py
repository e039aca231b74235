"""``zerop2p doctor``: real processes show it passing on tiny-llama and failing, with the unit
and the step named, on a unit pattern that splits GPT-2's tied embedding from the head that
reads it; the parts (comparison, unit audit, checks) are shown to bite on planted faults."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import coordinator_helpers
import httpx
import pytest
import torch

from communication.grpc_transport import GrpcTransport
from worker.cli.doctor.checks import (
    clock_check,
    coordinator_checks,
    links_from_telemetry,
    port_check,
    remote_peer_checks,
)
from worker.cli.doctor.parity import CODEC_UPDATE_TOL, EXACT_TOL, compare, tolerance_for
from worker.cli.doctor.report import Findings, render
from worker.cli.doctor.units import UnitAudit, audit_units
from worker.cli.options import build_train_config
from worker.cluster.ports import free_port
from worker.main import build_data, build_trainable_model
from worker.train.trainer import rank_micro_batch

ROOT = Path(__file__).resolve().parents[1]
DOCTOR = [sys.executable, "-m", "worker.cli", "doctor"]


def doctor(*args: str, timeout: float = 170) -> tuple[subprocess.CompletedProcess, dict]:
    res = subprocess.run([*DOCTOR, *args, "--json"], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    lines = res.stdout.strip().splitlines()
    assert lines, res.stderr[-3000:]
    return res, json.loads(lines[-1])


@pytest.mark.timeout(180)
def test_doctor_passes_on_tiny_llama_with_two_workers():
    res, verdict = doctor("--model", "tiny-llama", "--world-size", "2")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert verdict["passed"] is True and verdict["world_size"] == 2
    assert verdict["tolerance"]["kind"] == "exact"
    assert 0 <= verdict["max_loss_diff"] <= EXACT_TOL and 0 <= verdict["max_param_diff"] <= EXACT_TOL
    assert len(verdict["losses_sharded"]) == 3 and None not in verdict["losses_sharded"]
    assert verdict["losses_sharded"][-1] < verdict["losses_sharded"][0]  # it trained
    checks = {c["name"]: c["status"] for c in verdict["checks"]}
    for name in ("token", "clock skew", "peer port", "links rank 0", "links rank 1"):
        assert checks[name] == "ok", verdict["checks"]
    text = res.stdout
    assert "verdict: PASSED" in text and "loss one process" in text and "model.layers.1" in text


@pytest.mark.timeout(180)
def test_doctor_fails_on_a_unit_pattern_that_splits_a_tied_weight_from_its_reader():
    """``transformer\\.wte`` makes GPT-2's embedding a unit of its own; the head, in the root
    unit, reads the same (tied) weight after the embedding unit was freed. The engine does not
    refuse the pattern; the sharded run dies at step 0, and the doctor says where and why."""
    res, verdict = doctor("--model", "tiny-gpt2", "--world-size", "2",
                          "--unit-pattern", r"transformer\.wte")
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    assert verdict["passed"] is False and verdict["first_bad_step"] == 0
    assert verdict["losses_sharded"] == [None, None, None]
    assert None not in verdict["losses_one_process"]
    (flagged,) = verdict["units_flagged"]
    assert flagged["module"] == "transformer.wte"
    assert flagged["reads"] == ["transformer.wte.weight read by lm_head (linear)"]
    assert "failed" in verdict["sharded_error"], verdict["sharded_error"]
    unit_row = next(line for line in res.stdout.splitlines() if "transformer.wte " in line)
    assert "lm_head" in unit_row and "<- FAIL" in unit_row
    assert "the sharded run has no loss here" in res.stdout and "verdict: FAILED" in res.stdout


def test_doctor_refuses_what_it_cannot_compare_before_starting_anything():
    res = subprocess.run([*DOCTOR, "--checkpoint-dir", "ckpt"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "--checkpoint-dir" in res.stderr
    res = subprocess.run([*DOCTOR, "--world-size", "3", "--micro-batch-rows", "4"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "micro_batch_rows (4)" in res.stderr


def test_comparison_bites_on_a_changed_loss_a_changed_weight_and_a_missing_one():
    w = {"a": torch.ones(3), "b": torch.zeros(2)}
    init = {"a": torch.zeros(3), "b": torch.ones(2)}
    exact = tolerance_for(build_train_config([]))
    same = compare(steps=2, sharded_losses=[1.0, 0.5], sharded_weights=dict(w),
                   single_losses=[1.0, 0.5], single_weights=w, initial=init, tolerance=exact)
    assert same.passed and same.max_loss_diff == 0 and same.first_bad_step is None
    loss = compare(steps=2, sharded_losses=[1.0, 0.6], sharded_weights=dict(w),
                   single_losses=[1.0, 0.5], single_weights=w, initial=init, tolerance=exact)
    assert not loss.passed and loss.first_bad_step == 1
    moved = {"a": torch.ones(3), "b": torch.tensor([0.0, 1e-4])}
    param = compare(steps=2, sharded_losses=[1.0, 0.5], sharded_weights=moved,
                    single_losses=[1.0, 0.5], single_weights=w, initial=init, tolerance=exact)
    assert not param.passed and param.worst_param == "b"
    gone = compare(steps=2, sharded_losses=[1.0, 0.5], sharded_weights={"a": w["a"]},
                   single_losses=[1.0, 0.5], single_weights=w, initial=init, tolerance=exact)
    assert not gone.passed and gone.missing == ["b"]
    lossy = tolerance_for(build_train_config(["--codec", "int8"]))
    assert lossy.kind == "update" and lossy.param == CODEC_UPDATE_TOL
    near = {"a": torch.ones(3) * 1.01, "b": torch.zeros(2)}  # update error 0.017/1.7 = 0.01
    assert compare(steps=1, sharded_losses=[1.0], sharded_weights=near, single_losses=[1.001],
                   single_weights=w, initial=init, tolerance=lossy).passed
    assert not compare(steps=1, sharded_losses=[1.0], sharded_weights=init, single_losses=[1.0],
                       single_weights=w, initial=init, tolerance=lossy).passed  # never trained


def _audit(*args: str):
    cfg = build_train_config(["--model", "tiny-gpt2", "--seq-len", "32", *args])
    data = build_data(cfg)
    model = build_trainable_model(cfg, data)
    batch = rank_micro_batch(data, cfg, step=0, micro=0, rank=0, world_size=1,
                             device=torch.device("cpu"))
    return audit_units(model, batch, pattern=cfg.unit_pattern)


def test_unit_audit_finds_reads_outside_a_unit_and_passes_the_automatic_units():
    assert _audit().passed and [r.module for r in _audit().rows] == ["", "transformer.h.0",
                                                                     "transformer.h.1"]
    split = _audit("--unit-pattern", r"transformer\.(wte|h\.\d+)")
    assert [r.module for r in split.flagged] == ["transformer.wte"]
    tie = _audit("--unit-pattern", "lm_head")  # the engine refuses this one outright
    assert not tie.passed and "tied" in tie.error
    assert "no module name" in _audit("--unit-pattern", "nothing").error


def test_checks_fail_on_a_taken_port_a_dead_coordinator_and_a_far_clock():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_check("127.0.0.1", port, "t").status == "fail"
    assert port_check("127.0.0.1", 0, "t").status == "ok"
    (dead,) = coordinator_checks(f"http://127.0.0.1:{port}", "t")
    assert dead.status == "fail" and "did not answer" in dead.detail
    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:15:20 GMT"  # 1700000120: two minutes ahead
    assert clock_check({"date": date}, now, now + 0.01).status == "fail"
    assert clock_check({"date": "Tue, 14 Nov 2023 22:13:20 GMT"}, now, now + 0.01).status == "ok"
    rows = [{"metrics": {"rank": 0, "peer1_rtt_ms": 0.5, "peer1_send_mb_s": 80.0}},
            {"metrics": {"rank": 1}}]
    zero, one = links_from_telemetry(rows, 2)
    assert zero.status == "ok" and "rtt 0.50 ms, send 80.0 MB/s" in zero.detail
    assert one.status == "warn" and "not measured" in one.detail


def test_remote_checks_against_a_running_coordinator_and_its_workers(url):
    """``--coordinator``: the right token is accepted and a wrong one refused, the clock is
    close, an alive worker answers its Ping and a dead address is named."""
    token, dead = coordinator_helpers.TOKEN, free_port("127.0.0.1")
    good, clock = coordinator_checks(url, token)
    assert (good.status, clock.status) == ("ok", "ok"), (good, clock)
    (refused, _) = coordinator_checks(url, "not-the-token")
    assert refused.status == "fail" and "HTTP 401" in refused.detail
    peer = GrpcTransport(host="127.0.0.1", port=0, token=token)
    try:
        for wid, port in (("alive", peer.port), ("gone", dead)):
            httpx.post(f"{url}/workers/register", json={"worker_id": wid, "ip_address": "127.0.0.1",
                       "port": port}, headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        checks = {c.name: c for c in remote_peer_checks(url, token)}
    finally:
        peer.close()
    assert checks["peer alive"].status == "ok" and "Ping answered" in checks["peer alive"].detail
    assert checks["peer gone"].status == "fail" and f"127.0.0.1:{dead}" in checks["peer gone"].detail


def test_report_marks_the_first_differing_step_and_names_the_weight():
    """A run that trains on but computes something else: the table points at the step and
    the verdict names the weight (the report, with both runs finished)."""
    w, init = {"h.0.w": torch.ones(4)}, {"h.0.w": torch.zeros(4)}
    parity = compare(steps=3, sharded_losses=[2.0, 1.5, 1.4], sharded_weights={"h.0.w": w["h.0.w"] + 0.1},
                     single_losses=[2.0, 1.5, 1.2], single_weights=w, initial=init,
                     tolerance=tolerance_for(build_train_config([])))
    findings = Findings(title="t", world_size=2, steps=3, parity=parity,
                        units=UnitAudit(rows=[], pattern=None))
    text = render(findings)
    row = next(line for line in text.splitlines() if line.strip().startswith("2 "))
    assert "<- first difference" in row and "2.00e-01" in row
    assert not findings.passed and "verdict: FAILED" in text
    assert "losses differ from step 2" in text and "h.0.w differs by 0.1" in text
    assert findings.to_json()["first_bad_step"] == 2
