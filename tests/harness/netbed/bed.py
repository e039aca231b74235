"""``NetBed``: a coordinator and N workers whose every connection crosses a profiled link.

    with NetBed(PROFILES["wan-100m"], world_size=2, worker_args=[...]) as bed:
        bed.check()                       # optional: run() checks first anyway
        workers = bed.run(timeout=600)    # list of launcher Child, each with its output lines

A shaped profile puts every host in its own namespace (``namespaces``: veth access links, tbf
both ways) and a delay proxy (``proxy``) in front of every server, in the server's namespace:
a worker's gRPC server and the coordinator bind the namespace's loopback, so the only way in
is the proxy on the host's 10.77.0.x address, and each byte crosses the shaped link once.
Workers advertise the proxy's address (``--advertise``). ``lan`` adds nothing: the same
processes on the shared loopback (ports chosen by the OS), no root needed.

Before every run the bed checks itself (``linkcheck``: ``measure``, ``check``) and refuses a
link that is more than 20% off its profile. ``apply`` builds a different link than the profile
expects: only for the self-check's negative control. Everything started is stopped, and every
namespace removed, on exit, on an exception, and on SIGINT/SIGTERM/SIGHUP (turned into
KeyboardInterrupt while the bed is open; a signal during teardown is held until teardown is
done).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.netbed import proxy as proxy_mod
from harness.netbed import selfcheck
from harness.netbed.linkcheck import CHECK_PORT, LinkCheck
from harness.netbed.namespaces import Host, Topology, missing_tools, sweep_leftovers
from harness.netbed.profiles import Profile
from harness.netbed.selfcheck import CheckResult, LinkCheckError
from worker.cluster.launcher import (
    WORKER_ENTRY,
    Child,
    kill_all,
    local_worker_env,
    spawn,
    start_coordinator,
    stop_all,
    supervise,
    token_env,
    worker_argv,
)

log = logging.getLogger(__name__)

TESTS = Path(__file__).resolve().parents[2]
ROOT = TESTS.parent
GRPC_PORT, HTTP_PORT = 50051, 8000  # public ports, only inside namespaces (also CHECK_PORT)
INNER = 10000  # a server behind a proxy binds 127.0.0.1:(public + INNER) in its namespace
PROXY_READY = re.compile(rf"{proxy_mod.READY} (\S+)")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStats:
    """One ``run``: its wall time and the CPU time all proxies used meanwhile."""

    wall_s: float
    proxy_cpu_s: float

    @property
    def proxy_cpu_share(self) -> float:
        """Proxy CPU as a share of the wall time (1.0 = one of this machine's cores)."""
        return self.proxy_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: netbed tears down")


class NetBed(LinkCheck):
    """A coordinator, N workers and the links between them; see the module docstring.

    Where things go is four hooks a subclass (``islands.IslandBed``) replaces: ``_roles`` (one
    namespace each), ``_proxied_ports`` (each host's public ports), ``_check_roles`` (the link
    the self-check measures) and ``_worker_argv``; ``local_bypass`` makes a host's proxy
    forward its own host's connections without delay. ``measure`` and ``check`` (the
    self-check) are ``linkcheck.LinkCheck``'s."""

    local_bypass = False  # one worker per namespace: nothing local ever dials a proxy

    def __init__(self, profile: Profile, *, world_size: int, worker_args: Sequence[str] = (),
                 worker_env: dict | None = None, token: str = "netbed-token", echo: bool = False,
                 apply: Profile | None = None, tolerance: float = selfcheck.TOLERANCE,
                 worker_entry: Sequence[str] = WORKER_ENTRY, handle_signals: bool = True) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, not {world_size}")
        self.profile = profile  # what the self-check expects
        self.link = apply or profile  # what is built
        self.world_size = world_size
        self.worker_args = list(worker_args)
        self.worker_env = worker_env
        self.token = token
        self.echo = echo
        self.tolerance = tolerance
        self.worker_entry = list(worker_entry)
        self.handle_signals = handle_signals
        self.topology: Topology | None = None
        self.proxies: list[Child] = []
        self.coordinator: Child | None = None
        self.workers: list[Child] = []
        self.last_check: CheckResult | None = None
        self.last_run: RunStats | None = None
        self._pending: CheckResult | None = None  # a check not yet used by a run
        self._url: str | None = None
        self._checker: list[Child] = []  # the self-check's server while it runs
        self._saved: dict[int, object] = {}
        self._env = {"PYTHONPATH": os.pathsep.join(
            [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, _interrupt) for s in SIGNALS}
        try:
            if not missing_tools():
                sweep_leftovers()  # a lan bed run as root cleans up after a killed one too
            if self.link.shaped:
                self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        if lacks := missing_tools():
            raise RuntimeError(f"link profile {self.link.name} needs network namespaces: "
                               f"missing {', '.join(lacks)}")
        self.topology = Topology(roles=self._roles(), bandwidth_mbit=self.link.bandwidth_mbit)
        self.topology.create()
        if self.link.rtt_ms <= 0:
            return
        for role, ports in self._proxied_ports().items():
            self._start_proxy(self.topology.hosts[role], ports)

    def _roles(self) -> list[str]:
        """One namespace each: the coordinator's, then one per worker."""
        return ["c", *(f"w{i}" for i in range(self.world_size))]

    def _proxied_ports(self) -> dict[str, list[int]]:
        """The public ports each role's proxy serves (the self-check's on its server's host)."""
        ports = {"c": [HTTP_PORT], **{f"w{i}": [GRPC_PORT] for i in range(self.world_size)}}
        ports[self._check_roles()[0]].append(CHECK_PORT)
        return ports

    def _start_proxy(self, host: Host, ports: list[int]) -> None:
        delay_s = self.link.one_way_delay_s
        rate = (self.link.bandwidth_mbit or 10_000) * 1e6 / 8
        queue = max(8 << 20, int(2 * rate * delay_s))  # it must hold bandwidth x delay
        routes = [f"{host.address}:{p}=127.0.0.1:{p + INNER}" for p in ports]
        bypass = ["--local-bypass", host.address] if self.local_bypass else []
        argv = [*host.exec_prefix(), sys.executable, "-m", "harness.netbed.proxy",
                "--delay-ms", f"{delay_s * 1000:g}", "--queue-bytes", str(queue), *bypass, *routes]
        child, _ = spawn(f"proxy-{host.role}", argv, env=self._env, echo=self.echo,
                         wait_for=PROXY_READY, timeout=30.0)
        self.proxies.append(child)

    def close(self) -> None:
        """Stop every process and remove every namespace; idempotent. A signal arriving
        meanwhile is held and raised (KeyboardInterrupt) once everything is gone."""
        held: list[int] = []
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            before = {s: signal.signal(s, lambda n, f: held.append(n)) for s in SIGNALS}
        try:
            stop_all(self.workers, grace=10.0)
            if self.coordinator is not None:
                stop_all([self.coordinator], grace=5.0)
            kill_all(self.proxies + self._checker)
            if self.topology is not None:
                self.topology.destroy()
        finally:
            if in_main:
                for s, h in {**before, **self._saved}.items():
                    signal.signal(s, h)
                self._saved = {}
        if held:
            raise KeyboardInterrupt(f"{signal.Signals(held[0]).name} during netbed teardown")

    # --- where things run ------------------------------------------------------------------

    def _host(self, role: str) -> Host | None:
        return self.topology.hosts[role] if self.topology is not None else None

    def _serve(self, host: Host | None, public: int) -> tuple[list[str], str, int]:
        """(command prefix, bind address, port) for a server reachable at ``public``."""
        if host is None:
            return [], "127.0.0.1", 0  # lan: loopback, a port the OS picks
        if self.link.rtt_ms > 0:
            return host.exec_prefix(), "127.0.0.1", public + INNER  # behind the proxy
        return host.exec_prefix(), host.address, public

    def proxy_cpu_seconds(self) -> float:
        """CPU time used so far by all of this bed's proxies."""
        return sum(cpu_seconds(p.proc.pid) for p in self.proxies)

    # --- a training run ----------------------------------------------------------------------

    @property
    def coordinator_url(self) -> str | None:
        return self._url if self.coordinator is not None else None

    def run(self, *, timeout: float = 600.0, max_restarts: int = 0) -> list[Child]:
        """Self-check (unless a check since the last run is at hand), then a fresh coordinator
        and ``world_size`` workers until every worker exits 0 (the launcher's ``supervise``).
        Returns the workers; ``last_run`` holds the wall time and the proxies' CPU."""
        result = self._pending or self.check(strict=False)
        self._pending = None  # the next run checks again
        if not result.ok:
            raise LinkCheckError(result)
        self._start_coordinator()
        cpu0, t0 = self.proxy_cpu_seconds(), time.monotonic()
        try:
            env = {**local_worker_env(self.world_size, self.worker_env),  # cores shared, as locally
                   **token_env(self.token)}
            self.workers = [spawn(f"w{i}", self._worker_argv(i), env=env,
                                  echo=self.echo)[0] for i in range(self.world_size)]
            supervise(self.workers, timeout=timeout, max_restarts=max_restarts)
            return self.workers
        finally:
            self.last_run = RunStats(wall_s=time.monotonic() - t0,
                                     proxy_cpu_s=self.proxy_cpu_seconds() - cpu0)
            stop_all(self.workers)
            stop_all([self.coordinator], grace=5.0)

    def _start_coordinator(self) -> None:
        host = self._host("c")
        if host is None:
            self.coordinator, self._url = start_coordinator(token=self.token, echo=self.echo)
            return
        prefix, bind, port = self._serve(host, HTTP_PORT)
        self.coordinator, _ = start_coordinator(token=self.token, echo=self.echo, host=bind,
                                                port=port, prefix=prefix)
        self._url = f"http://{host.address}:{HTTP_PORT}"

    def _worker_argv(self, i: int) -> list[str]:
        host = self._host(f"w{i}")
        return worker_argv(self._url, worker_id=f"w{i}", min_workers=self.world_size,
                           extra=self._net_args(host, [("--port", "--advertise", GRPC_PORT)])
                           + self.worker_args, entry=self._entry(host))

    def _entry(self, host: Host | None) -> list[str]:
        """The worker command, run inside ``host``'s namespace (lan: as it is)."""
        return self.worker_entry if host is None else [*host.exec_prefix(), *self.worker_entry]

    def _net_args(self, host: Host | None, servers: list[tuple[str, str, int]]) -> list[str]:
        """A worker's address flags on ``host``: ``--host`` and ``--bind-host``, then for each
        (port flag, advertise flag, public port) of its servers the port it binds and, behind
        a proxy, the proxy's address it advertises. lan: loopback, ports the OS picks."""
        if host is None:
            return ["--host", "127.0.0.1", *(a for flag, _, _ in servers for a in (flag, "0"))]
        _, bind, _ = self._serve(host, 0)
        net = ["--host", host.address, "--bind-host", bind]
        for port_flag, advertise_flag, public in servers:
            net += [port_flag, str(self._serve(host, public)[2])]
            if self.link.rtt_ms > 0:
                net += [advertise_flag, f"{host.address}:{public}"]
        return net
