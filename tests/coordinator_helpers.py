"""Real coordinators for tests: a ``python -m coordinator`` subprocess, or uvicorn in a thread."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from coordinator.app import create_app
from coordinator.config import Settings
from coordinator.server import bind

ROOT = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"^coordinator listening on (http://\S+)$")
TOKEN = "test-token"


@dataclass
class CoordinatorProcess:
    """``python -m coordinator`` as a child process; ``url`` once it printed its line."""

    db: str
    port: int = 0
    token: str | None = TOKEN
    heartbeat_timeout: float = 30.0
    log: Path | None = None
    proc: subprocess.Popen | None = None
    url: str = ""

    def start(self, deadline: float = 20.0) -> CoordinatorProcess:
        argv = [sys.executable, "-m", "coordinator", "--host", "127.0.0.1",
                "--port", str(self.port), "--db", self.db,
                "--heartbeat-timeout", str(self.heartbeat_timeout)]
        if self.token:
            argv += ["--token", self.token]
        stderr = open(self.log, "a") if self.log else subprocess.DEVNULL
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ZEROP2P_TOKEN", None)
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, env=env)
        if self.log:
            stderr.close()
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # drains stdout for the child's whole life: a full pipe blocks it
            for line in self.proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            first = lines.get(timeout=deadline)
        except queue.Empty:
            self.kill()
            raise TimeoutError(
                f"coordinator printed no URL within {deadline}s{self._tail()}") from None
        match = URL_LINE.match(first or "")
        if not match:
            self.kill()
            raise RuntimeError(f"coordinator's first line was {first!r}{self._tail()}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _tail(self) -> str:
        return "\n" + self.log.read_text()[-3000:] if self.log and self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def serve(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """An in-process coordinator: uvicorn in a thread on a free port; yields (url, app).

    The socket listens before the thread starts, so the URL is usable at once.
    """
    app = create_app(settings)
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client(url: str, token: str | None = TOKEN, timeout: float = 10.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def register(http: httpx.Client, worker_id: str, port: int = 50000, **extra) -> httpx.Response:
    body = {"worker_id": worker_id, "ip_address": "127.0.0.1", "port": port, **extra}
    response = http.post("/workers/register", json=body)
    response.raise_for_status()
    return response


def statuses(http: httpx.Client) -> dict[str, str]:
    return {w["worker_id"]: w["status"] for w in http.get("/workers").json()}


async def listed_workers(url: str, token: str = TOKEN) -> list[dict]:
    """``GET /workers`` as an operator reads it (a worker's client has no such call)."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        resp = await http.get(f"{url}/workers")
        resp.raise_for_status()
        return resp.json()


@contextmanager
def heartbeats(url: str, ids: list[str], period: float = 0.2) -> Iterator[None]:
    """Keep ``ids`` alive at the coordinator from a thread while the block runs (the others
    fall silent and are marked dead by the heartbeat timeout)."""
    stop = threading.Event()

    def beat() -> None:
        with client(url) as http:
            while not stop.wait(period):
                for w in ids:
                    http.post(f"/workers/{w}/heartbeat", json={})

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
