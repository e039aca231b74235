"""The bed's self-check, bed side: start the check's server behind a proxy, run the client on
the other host, and hold what it measured to the profile.

``LinkCheck`` is a mixin of ``bed.NetBed``; the processes and the judging are ``selfcheck``'s.
It measures one link, ``_check_roles`` (server, client): a placement hook a subclass
(``islands.IslandBed``) replaces. From the bed it uses where things run (``_host``,
``_serve``), the proxies' CPU (``proxy_cpu_seconds``) and the attributes annotated below.

    rtts, seconds, cpu = bed.measure("w1", nbytes=0)   # RTT samples only, from w1's host
    result = bed.check(strict=False)                   # measured and judged; run() uses it
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import sys
from collections.abc import Iterator

from harness.netbed import selfcheck
from harness.netbed.profiles import Profile
from harness.netbed.selfcheck import CheckResult, LinkCheckError
from worker.cluster.launcher import Child, kill_all, spawn

log = logging.getLogger(__name__)

CHECK_PORT = 7000  # the self-check server's public port, only inside namespaces
CHECK_READY = re.compile(rf"{selfcheck.READY} (\S+)")


class LinkCheck:
    """``measure`` and ``check`` for a bed; see the module docstring."""

    # set by the bed's __init__
    profile: Profile  # what the check expects
    link: Profile  # what was built
    world_size: int
    tolerance: float
    echo: bool
    last_check: CheckResult | None
    _pending: CheckResult | None  # a check not yet used by a run
    _checker: list[Child]  # the self-check's server while it runs (the bed's close kills it)
    _env: dict[str, str]

    def _check_roles(self) -> tuple[str, str]:
        """(server, client) of the self-check: worker 1 (or, for a single worker, the
        coordinator's host) dials worker 0's host."""
        return "w0", "w1" if self.world_size > 1 else "c"

    @contextlib.contextmanager
    def _check_server(self) -> Iterator[str]:
        """A self-check server on the check's server host, behind its proxy; yields the
        address a client dials, and stops the server on the way out."""
        host = self._host(self._check_roles()[0])
        prefix, bind, port = self._serve(host, CHECK_PORT)
        argv = [*prefix, sys.executable, "-m", "harness.netbed.selfcheck", "serve",
                "--host", bind, "--port", str(port)]
        server, bound = spawn("selfcheck", argv, env=self._env, echo=self.echo,
                              wait_for=CHECK_READY, timeout=30.0)
        self._checker = [server]
        try:
            yield bound if host is None else f"{host.address}:{CHECK_PORT}"
        finally:
            kill_all([server])

    def measure(self, client: str | None = None, *, nbytes: int = selfcheck.TRANSFER_BYTES,
                pings: int = 9) -> tuple[list[float], float, float]:
        """RTT samples (ms), seconds of an ``nbytes`` upload and the proxies' CPU seconds
        meanwhile, from ``client``'s host (default: the check's client) to the self-check
        server; ``nbytes=0`` measures the RTT only."""
        host = self._host(client or self._check_roles()[1])
        prefix = host.exec_prefix() if host is not None else []
        bw = self.link.bandwidth_mbit or 1000.0
        transfer_timeout = 30.0 + 3 * nbytes * 8 / (bw * 1e6)
        with self._check_server() as target:
            rtts = selfcheck.client(prefix, ["ping", "--target", target, "--count", str(pings)],
                                    env=self._env, timeout=30.0)["rtt_ms"]
            if nbytes <= 0:
                return rtts, 0.0, 0.0
            cpu0 = self.proxy_cpu_seconds()
            sent = selfcheck.client(prefix, ["transfer", "--target", target, "--bytes",
                                             str(nbytes), "--timeout", str(transfer_timeout)],
                                    env=self._env, timeout=transfer_timeout + 10)
            return rtts, sent["seconds"], self.proxy_cpu_seconds() - cpu0

    def check(self, *, strict: bool = True, nbytes: int = selfcheck.TRANSFER_BYTES,
              pings: int = 9) -> CheckResult:
        """Measure RTT and throughput across one link (``_check_roles``: the client dials the
        server's host through its proxy) and hold them to the profile. ``strict``: raise
        LinkCheckError when off; either way ``run`` refuses then."""
        rtts, seconds, cpu = self.measure(nbytes=nbytes, pings=pings)
        rtt = statistics.median(rtts)
        mbit = selfcheck.goodput_mbit(nbytes, seconds, rtt)
        result = CheckResult(
            profile=self.profile, rtt_ms=rtt, rtt_samples_ms=tuple(rtts), transfer_bytes=nbytes,
            transfer_s=seconds, mbit_s=mbit, proxy_cpu_s=cpu,
            proxy_cpu_share=cpu / seconds if seconds > 0 else 0.0, tolerance=self.tolerance,
            problems=selfcheck.problems(self.profile, rtt_ms=rtt, mbit_s=mbit,
                                        tolerance=self.tolerance))
        log.info("%s", result.summary())
        self.last_check = self._pending = result
        if strict and not result.ok:
            raise LinkCheckError(result)
        return result
