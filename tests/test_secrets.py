"""Secrets off argv: the launcher hands tokens over in the environment, a local run makes a
random one, ``--token-file`` works for coordinator and worker, and servers that listen beyond
loopback without TLS say so. Real processes; /proc shows what another local user would see."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from communication.grpc_transport import GrpcTransport
from worker.cluster.launcher import (
    TOKEN_ENV,
    URL_LINE,
    kill_all,
    new_token,
    run_local_cluster,
    spawn,
    start_coordinator,
)

TOKEN = "s3cret-token-for-the-test"


def cmdline(pid: int) -> str:
    """What ``ps`` shows every local user of a process."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/workers", headers=headers, timeout=10).status_code


@pytest.mark.timeout(60)
def test_the_launcher_keeps_the_token_off_argv():
    coordinator, url = start_coordinator(token=TOKEN, echo=False)
    try:
        assert TOKEN not in cmdline(coordinator.proc.pid)
        assert status(url, None) == 401 and status(url, TOKEN) == 200  # it has the token
    finally:
        kill_all([coordinator])


@pytest.mark.timeout(60)
def test_the_coordinator_reads_its_token_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    argv = [sys.executable, "-m", "coordinator", "--port", "0", "--db", ":memory:",
            "--token-file", str(path)]
    coordinator, url = spawn("coordinator", argv, echo=False, wait_for=URL_LINE, timeout=60)
    try:
        assert status(url, None) == 401 and status(url, TOKEN) == 200
        assert status(url, "wrong") == 401
    finally:
        kill_all([coordinator])
    path.write_text("")
    done = subprocess.run([*argv[:-1], str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "the file is empty" in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, words", [
    (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
    (["--token-file", "/dev/null"], "the file is empty"),
    (["--token", "x", "--token-file", "/dev/null"], "not both"),
])
def test_a_bad_token_file_stops_the_worker_naming_it(extra, words):
    done = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--coordinator",
                           "http://127.0.0.1:9", *extra], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and words in done.stderr + done.stdout


@pytest.mark.timeout(180)
def test_a_local_run_makes_a_random_token_and_hands_it_over_in_the_environment(tmp_path):
    assert new_token() != new_token() and len(new_token()) >= 32
    workers = run_local_cluster(1, ["--model", "tiny-gpt2", "--steps", "1", "--max-tokens",
                                    "20000", "--seq-len", "32", "--micro-batch-rows", "2"],
                                echo=False, timeout=150)
    token = workers[0].env[TOKEN_ENV]
    assert len(token) >= 32 and token != "local-token"
    assert all(token not in " ".join(w.argv) for w in workers)


def test_a_peer_server_beyond_loopback_without_tls_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="communication.grpc_transport"):
        GrpcTransport(host="127.0.0.1", token=TOKEN).close()
        assert not caplog.records
        GrpcTransport(host="0.0.0.0", token=None).close()
    message = caplog.records[-1].getMessage()
    assert "plain gRPC" in message and "no token" in message
