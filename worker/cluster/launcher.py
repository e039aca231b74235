"""Start a local coordinator and N worker processes, stream their output with rank prefixes.

Used by ``zerop2p train``, ``scripts/launch_workers.py``, the benchmarks and the tests.
Every wait has a deadline; on failure or timeout every child is killed and the failing one named.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.cluster.progress import ProgressLine

log = logging.getLogger(__name__)

TOKEN_ENV = "ZEROP2P_TOKEN"
URL_LINE = re.compile(r"coordinator listening on (https?://\S+)")
WORKER_ENTRY = (sys.executable, "-m", "worker.cli")  # the zerop2p command of this interpreter


@dataclass(slots=True, kw_only=True)
class Child:
    """A child process whose output is copied, prefixed, to our stdout by its own thread."""

    name: str
    proc: subprocess.Popen
    argv: list[str]  # how it was started: a restart runs the same command
    env: dict | None = None
    echo: bool = True
    lines: list[str] = field(default_factory=list)  # kept across restarts
    thread: threading.Thread | None = None


def _pump(child: Child, echo: bool, first_match: re.Pattern | None, found: dict,
          event: threading.Event) -> None:
    for line in child.proc.stdout:
        line = line.rstrip("\n")
        child.lines.append(line)
        if echo:
            print(f"[{child.name}] {line}", flush=True)
        if first_match is not None and not event.is_set():
            m = first_match.search(line)
            if m:
                found["match"] = m.group(1)
                event.set()
    event.set()  # the process closed its output: wake any waiter


def spawn(name: str, argv: list[str], *, env: dict | None = None, echo: bool = True,
          wait_for: re.Pattern | None = None, timeout: float = 60.0,
          history: list[str] | None = None) -> tuple[Child, str | None]:
    """Start ``argv`` with merged stdout/stderr; optionally wait for a line matching ``wait_for``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    child = Child(name=name, proc=proc, argv=argv, env=env, echo=echo,
                  lines=history if history is not None else [])
    found: dict = {}
    event = threading.Event()
    child.thread = threading.Thread(target=_pump, args=(child, echo, wait_for, found, event),
                                    daemon=True)
    child.thread.start()
    if wait_for is not None:
        if not event.wait(timeout) or "match" not in found:
            kill_all([child])
            tail = "\n".join(child.lines[-20:])
            raise RuntimeError(f"{name} did not print {wait_for.pattern!r} within {timeout}s:\n{tail}")
    return child, found.get("match")


def new_token() -> str:
    """A random cluster token (192 bits), for a run that was given none."""
    return secrets.token_urlsafe(24)


def token_env(token: str | None) -> dict[str, str]:
    """The environment that hands ``token`` to a coordinator or worker: never argv, which
    every local user can read in ``ps``."""
    return {TOKEN_ENV: token} if token else {}


def start_coordinator(*, token: str | None, db: str = ":memory:", heartbeat_timeout: float = 10.0,
                      echo: bool = True, port: int = 0, host: str = "127.0.0.1",
                      prefix: Sequence[str] = (), stall_after: float | None = None,
                      tls_dir: str | None = None) -> tuple[Child, str]:
    """A real coordinator (on a free port unless ``port`` is given); returns it and the URL it
    printed. ``prefix`` runs it under another command (``ip netns exec NS`` in the test bed).
    The token travels in its environment. ``tls_dir``: HTTPS and the cluster CA kept there
    (``--tls auto``; workers join with ``--ca tls_dir/ca.pem``)."""
    argv = [*prefix, sys.executable, "-m", "coordinator", "--host", host, "--port", str(port),
            "--db", db, "--heartbeat-timeout", str(heartbeat_timeout)]
    if tls_dir is not None:
        argv += ["--tls", "auto", "--tls-dir", tls_dir]
    if stall_after is not None:
        argv += ["--stall-after", str(stall_after)]
    child, url = spawn("coordinator", argv, env=token_env(token), echo=echo, wait_for=URL_LINE,
                       timeout=60.0)
    return child, url


def worker_argv(url: str, *, worker_id: str, min_workers: int, extra: list[str],
                entry: Sequence[str] = WORKER_ENTRY) -> list[str]:
    """``entry worker --coordinator URL ...``: ``entry`` is the zerop2p CLI (a test harness
    passes its own entry that installs observers first). The token goes in the environment
    (``token_env``)."""
    argv = [*entry, "worker", "--coordinator", url,
            "--worker-id", worker_id, "--min-workers", str(min_workers)]
    return argv + extra


def restart(child: Child) -> Child:
    """The same command again under the same name; its output continues the old lines."""
    return spawn(child.name, child.argv, env=child.env, echo=child.echo, history=child.lines)[0]


def supervise(children: list[Child], *, timeout: float, max_restarts: int = 0) -> None:
    """Wait until every child exits 0. A child that fails is restarted (same command) up to
    ``max_restarts`` times in all; past that, or at the deadline, every child is stopped
    (stop_all: SIGINT, then SIGKILL) and the failing one named. ``children`` is updated in
    place with the restarted processes."""
    exits: queue.Queue[Child] = queue.Queue()

    def watch(c: Child) -> None:
        threading.Thread(target=lambda: (c.proc.wait(), exits.put(c)), daemon=True).start()

    for child in children:
        watch(child)
    deadline = time.monotonic() + timeout
    pending = {c.name for c in children}
    restarts = 0
    while pending:
        try:
            child = exits.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            stop_all(children)  # SIGINT first: a worker leaves its coordinator
            raise TimeoutError(f"{sorted(pending)} still running after {timeout}s") from None
        if child.proc.returncode == 0:
            pending.discard(child.name)
            continue
        if restarts < max_restarts:
            restarts += 1
            log.warning("%s exited with code %d; restarting it (%d of %d)", child.name,
                        child.proc.returncode, restarts, max_restarts)
            fresh = restart(child)
            children[children.index(child)] = fresh
            watch(fresh)
            continue
        stop_all(children)
        if child.thread:
            child.thread.join(timeout=5)
        tail = "\n".join(child.lines[-30:])
        raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{tail}")
    for child in children:
        if child.thread:
            child.thread.join(timeout=5)


def stop_all(children: list[Child], *, grace: float = 10.0) -> None:
    """SIGINT every child still running (workers leave the coordinator), SIGKILL after ``grace``."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    kill_all(children)


def kill_all(children: list[Child]) -> None:
    """SIGKILL every child still running and reap it."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
    for child in children:
        try:
            child.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) did not die after SIGKILL", child.name, child.proc.pid)


def local_worker_env(world_size: int, env: dict | None = None) -> dict:
    """``env`` plus an OpenMP thread count that shares this machine's cores among
    ``world_size`` local workers, unless the caller set one (as torchrun does): two workers with
    a thread per core each spin against each other at every collective, which cost 1-2 s per
    step when the collectives are small (a LoRA step with a replicated base, 2 workers, 2 cores)."""
    env = dict(env or {})
    if "OMP_NUM_THREADS" not in env and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(world_size, 1)))
    return env


def run_local_cluster(world_size: int, worker_args: list[str], *, token: str | None = None,
                      timeout: float = 1800.0, echo: bool = True, max_restarts: int = 0,
                      worker_env: dict | None = None,
                      worker_entry: Sequence[str] = WORKER_ENTRY,
                      tls_dir: str | None = None,
                      progress_steps: int | None = None) -> list[Child]:
    """Coordinator + ``world_size`` workers on this machine; returns once all workers succeed.

    A crashed worker is restarted under its own id (up to ``max_restarts`` times): it registers
    again, which ends the generation, and the workers resume together from the last checkpoint.
    Without ``token`` the run makes a random one, handed to every process in its environment.
    With ``tls_dir`` the coordinator is the cluster's CA (kept there) and the workers talk
    HTTPS to it and mutual TLS to each other, each keeping its identity in ``tls_dir/w<i>``.
    ``progress_steps``: show the run's progress out of that many steps from the coordinator's
    view (progress.py; on a terminal a bar, and the workers' output is kept, not echoed).
    """
    token = token or new_token()
    coordinator, url = start_coordinator(token=token, echo=echo, tls_dir=tls_dir)
    workers: list[Child] = []
    line = None
    if progress_steps and tls_dir is None:
        line = ProgressLine(url, token=token, total_steps=progress_steps)
        echo = echo and not line.terminal
    try:
        env = {**local_worker_env(world_size, worker_env), **token_env(token)}
        for i in range(world_size):
            tls = [] if tls_dir is None else ["--ca", os.path.join(tls_dir, "ca.pem"),
                                              "--identity-dir", os.path.join(tls_dir, f"w{i}")]
            argv = worker_argv(url, worker_id=f"w{i}", min_workers=world_size,
                               extra=tls + worker_args, entry=worker_entry)
            workers.append(spawn(f"w{i}", argv, env=env, echo=echo)[0])
        supervise(workers, timeout=timeout, max_restarts=max_restarts)
        return workers
    finally:
        if line is not None:
            line.close()
        stop_all(workers)
        kill_all([coordinator])
