"""The bed's self-check: what a link measures, and whether that matches its profile.

Two halves run in separate processes, one on each side of the link (the bed starts them in
their namespaces): ``serve`` is a TCP echo and sink server behind the server side's delay
proxy, ``ping`` and ``transfer`` are the client. The RTT is the median of several 64-byte
echoes on one open connection (the first, which also dials the proxy's upstream, is dropped);
the throughput is one 16 MB upload, timed until the server's one-byte ack, less one measured
RTT (the last byte's way there and the ack's way back). Both are held to the profile:
more than ``tolerance`` off is a refusal naming the profile, the expected and measured values.

    python -m harness.netbed.selfcheck serve --host H --port P      # prints a ready line
    python -m harness.netbed.selfcheck ping --target H:P --count 9  # prints JSON
    python -m harness.netbed.selfcheck transfer --target H:P --bytes 16777216
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from harness.netbed.profiles import Profile

log = logging.getLogger(__name__)

READY = "selfcheck listening on"
ECHO, SINK = b"E", b"S"
PING_BYTES = 64
TRANSFER_BYTES = 16 << 20
TOLERANCE = 0.20


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """One self-check: the measurements, the profile they were held to, and what was off.

    ``proxy_cpu_s`` is the CPU time all of the bed's proxies used during the transfer;
    ``proxy_cpu_share`` divides it by the transfer's wall time (1.0 = one whole core)."""

    profile: Profile
    rtt_ms: float
    rtt_samples_ms: tuple[float, ...]
    transfer_bytes: int
    transfer_s: float
    mbit_s: float
    proxy_cpu_s: float = 0.0
    proxy_cpu_share: float = 0.0
    tolerance: float = TOLERANCE
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "ok" if self.ok else "REFUSED: " + "; ".join(self.problems)
        return (f"self-check {self.profile.describe()}: rtt {self.rtt_ms:.1f} ms (median of "
                f"{len(self.rtt_samples_ms)}), throughput {self.mbit_s:.1f} Mbit/s "
                f"({self.transfer_bytes >> 20} MB in {self.transfer_s:.2f} s), proxies "
                f"{self.proxy_cpu_share:.1%} of a core during the transfer: {verdict}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile"] = asdict(self.profile)
        d["ok"] = self.ok
        return d


class LinkCheckError(RuntimeError):
    """The link measured something other than its profile; ``result`` says what."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__("; ".join(result.problems))
        self.result = result


def problems(profile: Profile, *, rtt_ms: float, mbit_s: float,
             tolerance: float = TOLERANCE) -> tuple[str, ...]:
    """What is more than ``tolerance`` off ``profile``; an unshaped bandwidth or a zero RTT is
    not held to anything (a lan measures whatever loopback gives)."""
    found = []
    checks = [("rtt", rtt_ms, profile.rtt_ms, "ms")] if profile.rtt_ms > 0 else []
    if profile.bandwidth_mbit is not None:
        checks.append(("throughput", mbit_s, profile.bandwidth_mbit, "Mbit/s"))
    for what, measured, expected, unit in checks:
        off = abs(measured - expected) / expected
        if off > tolerance:
            found.append(f"profile {profile.name}: {what} measured {measured:.1f} {unit}, "
                         f"expected {expected:g} {unit} (off by {off:.0%}, more than "
                         f"{tolerance:.0%})")
    return tuple(found)


def goodput_mbit(nbytes: int, seconds: float, rtt_ms: float) -> float:
    """Mbit/s of a transfer timed until its ack, less the one round trip it pays for that."""
    return nbytes * 8 / max(seconds - rtt_ms / 1000.0, 1e-6) / 1e6


# --- server side ---------------------------------------------------------------------------

async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        op = await reader.readexactly(1)
        if op == ECHO:
            while chunk := await reader.read(1 << 18):
                writer.write(chunk)
                await writer.drain()
        elif op == SINK:
            (left,) = struct.unpack("!Q", await reader.readexactly(8))
            while left > 0:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"sink: {left} bytes missing at EOF")
                left -= len(chunk)
            writer.write(b"K")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError) as err:
        log.debug("selfcheck connection ended: %s", err)
    finally:
        writer.close()


async def _serve(host: str, port: int) -> None:
    server = await asyncio.start_server(_handle, host, port, limit=1 << 20)
    print(f"{READY} {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


# --- client side ---------------------------------------------------------------------------

def _dial(target: str, timeout: float) -> socket.socket:
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def ping(target: str, *, count: int = 9, timeout: float = 10.0) -> list[float]:
    """Round-trip times in ms of ``count`` echoes on one connection (after one warm-up)."""
    with _dial(target, timeout) as sock:
        sock.sendall(ECHO)
        msg = b"p" * PING_BYTES
        times = []
        for _ in range(count + 1):
            t0 = time.perf_counter()
            sock.sendall(msg)
            if _recv_exactly(sock, PING_BYTES) != msg:
                raise ConnectionError(f"echo from {target} changed the bytes")
            times.append((time.perf_counter() - t0) * 1000.0)
    return times[1:]


def transfer(target: str, *, nbytes: int = TRANSFER_BYTES, timeout: float = 120.0) -> float:
    """Seconds from the first byte of an ``nbytes`` upload until the server's ack."""
    payload = memoryview(bytes(nbytes))
    with _dial(target, timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(SINK + struct.pack("!Q", nbytes))
        sock.sendall(payload)
        if _recv_exactly(sock, 1) != b"K":
            raise ConnectionError(f"sink at {target} did not acknowledge {nbytes} bytes")
        return time.perf_counter() - t0


async def echo(host: str, port: int, payload: bytes, *, timeout: float = 30.0) -> bytes:
    """Send ``payload`` to an echo server (or a proxy in front of one) and return what comes
    back, writing and reading at once so no buffer can fill up and stall both."""
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(ECHO + payload)
        writer.write_eof()
        got = await reader.read(-1)
        writer.close()
        return got
    return await asyncio.wait_for(go(), timeout)


def client(prefix: list[str], args: list[str], *, env: dict, timeout: float) -> dict:
    """Run one client command (``ping``/``transfer`` and its options) in a fresh process
    started with ``prefix`` (``ip netns exec NS`` or nothing); its JSON answer."""
    argv = [*prefix, sys.executable, "-m", "harness.netbed.selfcheck", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"self-check {args[0]} ({' '.join(args)}) took over "
                           f"{timeout:.0f}s") from None
    if done.returncode != 0:
        raise RuntimeError(f"self-check {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="harness.netbed.selfcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    p = sub.add_parser("ping")
    p.add_argument("--target", required=True)
    p.add_argument("--count", type=int, default=9)
    t = sub.add_parser("transfer")
    t.add_argument("--target", required=True)
    t.add_argument("--bytes", type=int, default=TRANSFER_BYTES)
    t.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.host, args.port))
    elif args.cmd == "ping":
        print(json.dumps({"rtt_ms": ping(args.target, count=args.count)}))
    else:
        seconds = transfer(args.target, nbytes=args.bytes, timeout=args.timeout)
        print(json.dumps({"bytes": args.bytes, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
