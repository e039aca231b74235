"""The island test bed (tests/harness/netbed/islands.py): lan inside a site, the profile across.

Real processes, sockets, namespaces and tbf; nothing is mocked. What needs root, ``ip`` and
``tc`` is skipped without them; the proxy's bypass and the workers' placement flags are
checked anywhere.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import sys
import time

import pytest
from harness.netbed import selfcheck
from harness.netbed.islands import IslandBed
from harness.netbed.namespaces import Host, Topology, list_namespaces, missing_tools
from harness.netbed.profiles import PROFILES, Profile

from worker.cluster.launcher import kill_all, spawn

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
needs_namespaces = pytest.mark.skipif(
    bool(missing_tools()), reason=f"the bed needs root, ip and tc; missing: {missing_tools()}")


def start(argv: list[str], ready: str):
    return spawn(argv[0].rsplit(".", 1)[-1], [sys.executable, "-m", *argv], env=ENV, echo=False,
                 wait_for=re.compile(rf"{ready} (\S+)"), timeout=30)


def ping_from(source: str, target: str, count: int = 7) -> float:
    """Median RTT (ms) of 64-byte echoes from local address ``source`` to ``target``."""
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(selfcheck.ECHO)
        times = []
        for _ in range(count + 1):
            t0 = time.perf_counter()
            s.sendall(b"p" * 64)
            got = b""
            while len(got) < 64:
                got += s.recv(64 - len(got))
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times[1:])


def bed_is_gone(bed: IslandBed, children) -> None:
    assert [ns for ns in list_namespaces() if ns.startswith(bed.topology.prefix)] == []
    running = [c.name for c in children if c.proc.poll() is None]
    assert running == [], f"{running} still running after the bed closed"


@pytest.mark.timeout(30)
def test_proxy_forwards_a_local_source_without_delay():
    """127.0.0.2 stands for another host, 127.0.0.1 for the proxy's own: one proxy, one
    target, only the source address differs."""
    server, server_addr = start(["harness.netbed.selfcheck", "serve"], selfcheck.READY)
    proxy, proxy_addr = start(["harness.netbed.proxy", "--delay-ms", "20", "--local-bypass",
                               "127.0.0.1", f"127.0.0.1:0={server_addr}"], "proxy ready on")
    try:
        local, remote = ping_from("127.0.0.1", proxy_addr), ping_from("127.0.0.2", proxy_addr)
        assert local < 2.0, f"local source: rtt {local:.2f} ms through the bypass"
        assert abs(remote - 40.0) <= 0.2 * 40.0, f"other source: rtt {remote:.1f} ms, not 40"
    finally:
        kill_all([proxy, server])


@pytest.mark.timeout(10)
def test_every_worker_is_placed_in_its_site_with_both_servers_behind_its_proxy():
    sites = {"c": "10.77.0.10", "s0": "10.77.0.11", "s1": "10.77.0.12"}
    hosts = {r: Host(role=r, ns=f"ns-{r}", address=a, hub_port="p") for r, a in sites.items()}

    def argv(flat: bool, i: int, profile: str = "wan-100m") -> list[str]:
        bed = IslandBed(PROFILES[profile], sites=[2, 2], worker_args=["--steps", "3"],
                        site_args={1: ["--lora-rank", "4"]}, flat=flat)
        if PROFILES[profile].shaped:  # what _build would make, without making it
            bed.topology = Topology(roles=list(sites), bandwidth_mbit=100, hosts=hosts)
        bed._url = "http://10.77.0.10:8000"
        return bed._worker_argv(i)

    w1 = argv(False, 1)
    assert w1[:4] == ["ip", "netns", "exec", "ns-s0"]
    assert " ".join(w1).endswith(
        "--worker-id w1 --min-workers 2 --host 10.77.0.11 --bind-host 127.0.0.1 --port 60052 "
        "--advertise 10.77.0.11:50052 --outer-port 61052 --outer-advertise 10.77.0.11:51052 "
        "--site s0 --sites s0,s1 --steps 3")
    w2 = " ".join(argv(False, 2))
    assert "--port 60051 --advertise 10.77.0.12:50051" in w2
    assert w2.endswith("--site s1 --sites s0,s1 --steps 3 --lora-rank 4")
    flat = " ".join(argv(True, 3))
    assert "--min-workers 4 " in flat and "--advertise 10.77.0.12:50052" in flat
    assert "--site" not in flat and "--outer" not in flat
    lan = " ".join(argv(False, 0, "lan"))
    assert lan.endswith("--host 127.0.0.1 --port 0 --outer-port 0 --site s0 --sites s0,s1 "
                        "--steps 3")
    with pytest.raises(ValueError, match="site_args for sites \\[2\\]"):
        IslandBed(PROFILES["lan"], sites=[1, 1], site_args={2: []})


@needs_namespaces
@pytest.mark.timeout(60)
def test_inside_a_site_is_lan_and_across_sites_is_the_profile():
    profile = PROFILES["wan-100m"]
    with IslandBed(profile, sites=[2, 2]) as bed:
        children = list(bed.proxies)
        inside, _, _ = bed.measure("s0", nbytes=0)
        across, _, _ = bed.measure("s1", nbytes=0)
        from_coordinator, _, _ = bed.measure("c", nbytes=0)
        assert statistics.median(inside) < 2.0, f"inside site s0: rtt {inside} ms"
        for rtts in (across, from_coordinator):
            assert abs(statistics.median(rtts) - profile.rtt_ms) <= 0.2 * profile.rtt_ms, rtts
        result = bed.check()  # cross-site rtt and throughput within 20% of the profile
        assert result.ok, result.summary()
        rtts, seconds, _ = bed.measure("s0", pings=3)  # the same 16 MB, inside the site
        lan_mbit = selfcheck.goodput_mbit(selfcheck.TRANSFER_BYTES, seconds, min(rtts))
        assert lan_mbit > 5 * profile.bandwidth_mbit, f"inside s0: {lan_mbit:.0f} Mbit/s"
    bed_is_gone(bed, children)


@needs_namespaces
@pytest.mark.timeout(30)
def test_island_bed_removes_everything_after_an_exception():
    bed = IslandBed(Profile(name="test", bandwidth_mbit=200, rtt_ms=10), sites=[3, 1])
    with pytest.raises(RuntimeError, match="boom"), bed:
        assert len([ns for ns in list_namespaces() if ns.startswith(bed.topology.prefix)]) == 4
        children = list(bed.proxies)
        assert len(children) == 3 and all(c.proc.poll() is None for c in children)
        raise RuntimeError("boom")
    bed_is_gone(bed, children)
