"""Network namespaces joined by tbf-shaped veth "access links" through one bridge.

One hub namespace holds a bridge; every host (the coordinator, each worker) gets its own
namespace and one veth pair: ``eth0`` inside the host, ``pK`` on the hub's bridge. tbf shapes
both ends' egress at the profile's bandwidth, so a host's upload and download are each
limited, and a byte from one host to another crosses exactly two shaped hops (the sender's
uplink, the receiver's downlink), at the same rate. Nothing is created in the root namespace:
the veth ends are made directly inside the two namespaces, and the private 10.77.0.0/24
addresses exist only there.

Every name carries ``zpnb-<pid of the bed>-<tag>-`` so a bed killed with SIGKILL leaves
namespaces that the next one finds (its pid is gone) and removes, processes inside first.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "zpnb"
SUBNET = "10.77.0"
LEFTOVER = re.compile(rf"^({PREFIX}-(\d+)-\w+-\w+)\b")


def ip(*args: str, timeout: float = 10.0) -> str:
    """Run ``ip ARGS``; RuntimeError naming the command and its stderr if it fails."""
    return _run(["ip", *args], timeout)


def tc(*args: str, timeout: float = 10.0) -> str:
    return _run(["tc", *args], timeout)


def _run(argv: list[str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def missing_tools() -> list[str]:
    """What the bed needs and this machine lacks: root, ``ip``, ``tc`` (empty when all there)."""
    lacks = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if os.geteuid() != 0:
        lacks.insert(0, "root")
    return lacks


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    """Processes living in namespace ``ns`` (ours: nothing else is ever started there)."""
    try:
        return [int(p) for p in ip("netns", "pids", ns).split()]
    except RuntimeError:
        return []  # already gone


def _kill_inside(ns: str) -> None:
    for pid in pids_in(ns):
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("killed pid %d left in namespace %s", pid, ns)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> list[str]:
    """Remove every bed namespace whose owning process is gone; returns their names."""
    swept = []
    for ns in list_namespaces():
        m = LEFTOVER.match(ns)
        if m and not _alive(int(m.group(2))):
            _kill_inside(ns)
            ip("netns", "del", ns)
            swept.append(ns)
    if swept:
        log.warning("removed namespaces left by a killed bed: %s", ", ".join(swept))
    return swept


@dataclass(frozen=True, slots=True, kw_only=True)
class Host:
    """One end of the topology: ``role`` ("c", "w0", ...), its namespace and address."""

    role: str
    ns: str
    address: str
    hub_port: str  # its veth end on the hub's bridge

    def exec_prefix(self) -> list[str]:
        """Prepend to a command line to run it inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns]


@dataclass(slots=True, kw_only=True)
class Topology:
    """The hub and one namespace per role, shaped at ``bandwidth_mbit`` (None: unshaped)."""

    roles: list[str]
    bandwidth_mbit: float | None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    hosts: dict[str, Host] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)  # namespaces, in creation order

    @property
    def prefix(self) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def create(self) -> None:
        """Build everything; on failure, remove what was built and raise."""
        if len(self.roles) > 240:
            raise ValueError(f"a bed holds at most 240 hosts, not {len(self.roles)}")
        try:
            self._add_ns(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
            ip("-n", self.hub, "link", "set", "br0", "up")
            for k, role in enumerate(self.roles):
                host = Host(role=role, ns=f"{self.prefix}-{role}", address=f"{SUBNET}.{10 + k}",
                            hub_port=f"p{k}")
                self._add_host(host)
                self.hosts[role] = host
        except BaseException:
            self.destroy()
            raise
        log.info("namespaces %s-*: %d hosts on %s.0/24, %s", self.prefix, len(self.roles),
                 SUBNET, "unshaped" if self.bandwidth_mbit is None
                 else f"tbf {self.bandwidth_mbit:g} Mbit/s each way")

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_ns(host.ns)
        ip("-n", host.ns, "link", "add", "eth0", "type", "veth", "peer", "name", host.hub_port,
           "netns", self.hub)
        ip("-n", self.hub, "link", "set", host.hub_port, "master", "br0", "up")
        ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.ns, "link", "set", "eth0", "up")
        if self.bandwidth_mbit is not None:
            self._shape(host.ns, "eth0")  # its upload
            self._shape(self.hub, host.hub_port)  # its download

    def _shape(self, ns: str, dev: str) -> None:
        """tbf at the profile's rate; a 2 ms burst and 100 ms of queue, as an access link has."""
        rate = int(self.bandwidth_mbit * 1e6)  # bit/s
        per_s = rate // 8
        burst = max(per_s // 500, 4096)
        limit = max(per_s // 10, 64 * 1024)
        tc("-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
           "burst", str(burst), "limit", str(limit))

    def destroy(self) -> None:
        """Kill anything still inside, delete every namespace (their veths go with them)."""
        for ns in reversed(self.created):
            _kill_inside(ns)
            try:
                ip("netns", "del", ns)
            except RuntimeError as err:
                log.error("could not delete namespace %s: %s", ns, err)
        self.created.clear()
