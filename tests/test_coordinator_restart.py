"""A real ``python -m coordinator`` process: the URL line, SIGKILL and restart on the same db."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from coordinator_helpers import ROOT, URL_LINE, CoordinatorProcess, client, register, statuses

from worker.cluster.launcher import URL_LINE as LAUNCHER_URL_LINE
from worker.cluster.launcher import spawn, stop_all

pytestmark = pytest.mark.timeout(60)


def ready(http, n, **params):
    r = http.get("/training/ready", params={"min_workers": n, **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_kill9_and_restart_keeps_workers_and_generation(tmp_path):
    db = str(tmp_path / "state.db")
    timeout = 1.5
    first = CoordinatorProcess(db=db, heartbeat_timeout=timeout, log=tmp_path / "c.log").start()
    try:
        with client(first.url) as http:
            for i in range(3):
                register(http, f"w{i}", port=51000 + i, device="cpu")
            gen = ready(http, 3, worker_id="w0")
            assert gen["generation"] == 1
            http.post("/telemetry", json={"worker_id": "w1", "step": 3, "loss": 0.5})
            registered = time.monotonic()
    finally:
        first.kill()
    assert first.proc.returncode == -9
    # Let every heartbeat grow older than the timeout while the coordinator is down: a
    # restart must give alive workers a fresh grace period, not declare them all dead.
    time.sleep(max(0.0, timeout + 0.2 - (time.monotonic() - registered)))
    second = CoordinatorProcess(db=db, port=first.port, heartbeat_timeout=timeout,
                                log=tmp_path / "c.log").start()
    try:
        assert second.url == first.url
        with client(second.url) as http:
            assert statuses(http) == {"w0": "alive", "w1": "alive", "w2": "alive"}
            assert [w["port"] for w in http.get("/workers").json()] == [51000, 51001, 51002]
            assert ready(http, 3, worker_id="w2")["workers"] == gen["workers"]
            assert ready(http, 3)["generation"] == 1
            rows = http.get("/telemetry", params={"worker_id": "w1"}).json()
            assert [r["metrics"] for r in rows] == [{"step": 3, "loss": 0.5}]
            # Without heartbeats they do die, one timeout after the restart; generation 1 ends.
            time.sleep(timeout + 0.5)
            assert statuses(http) == {"w0": "dead", "w1": "dead", "w2": "dead"}
            assert http.get("/training/generation").json()["generation"] is None
            register(http, "w1", port=51011)
            assert ready(http, 1)["generation"] == 2  # numbers keep rising across restarts
    finally:
        second.kill()


def test_stdout_is_one_line_and_settings_come_from_the_environment(tmp_path, monkeypatch):
    """Options left out come from ZEROP2P_<NAME> (token, db), not from defaults of the CLI."""
    monkeypatch.setenv("ZEROP2P_TOKEN", "from-env")
    monkeypatch.setenv("ZEROP2P_DB", str(tmp_path / "from-env.db"))
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        match = URL_LINE.match(line.rstrip("\n"))
        assert match, line
        with client(match.group(1), token=None) as anon:
            assert anon.get("/workers").status_code == 401
        with client(match.group(1), token="from-env") as http:
            register(http, "w0")
            assert ready(http, 1)["generation"] == 1
        assert (tmp_path / "from-env.db").stat().st_size > 0
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=10)
    assert rest == ""  # nothing but the URL line ever went to stdout


def test_zerop2p_coordinator_takes_its_log_level_from_the_environment():
    """ZEROP2P_LOG_LEVEL reaches the coordinator's own loggers under the zerop2p CLI too (the
    CLI used to set up logging first, which left them at INFO)."""
    argv = [sys.executable, "-m", "worker.cli", "coordinator", "--port", "0", "--db", ":memory:"]
    child, url = spawn("coordinator", argv, env={"ZEROP2P_LOG_LEVEL": "warning",
                                                 "ZEROP2P_TOKEN": ""},
                       echo=False, wait_for=LAUNCHER_URL_LINE, timeout=20)
    try:
        with client(url, token=None) as http:
            register(http, "w0")  # answered after start-up; start-up and registering log INFO
    finally:
        stop_all([child], grace=5)
        child.thread.join(5)
    err = "\n".join(child.lines)
    assert "no token set" in err  # a WARNING gets through
    assert " INFO " not in err, err
