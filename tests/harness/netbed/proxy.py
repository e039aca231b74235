"""A TCP forwarding proxy that holds every byte for a fixed one-way delay, each direction.

The kernel here has no ``netem``, so a link's latency is added in user space: the bed puts one
proxy in front of every server (a worker's gRPC port, the coordinator's HTTP port, the
self-check's echo port), on the server's own side of the shaped link. Bytes read from one side
are stamped with ``now + delay`` and written to the other side once due, so a request and its
reply each pay half the round trip and a connection pays the RTT exactly once per round trip.

Whole chunks are forwarded as read (no per-byte Python work); each direction has a bounded
queue, so a proxy that cannot write (a slow link) stops reading and TCP's own flow control
pushes back on the sender, as a real path does once its bytes in flight fill the window.

A connection whose source address is named by ``--local-bypass`` (the host's own address: a
process in the same namespace, a worker dialing a peer of its own site) is forwarded with no
delay and no pacing: it never leaves the host, so it is a lan, not a link.

    python -m harness.netbed.proxy --delay-ms 25 [--local-bypass ADDR] LISTEN_HOST:PORT=TARGET_HOST:PORT [...]

prints ``proxy ready on HOST:PORT[,HOST:PORT...]`` (port 0 is replaced by the bound one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections import deque
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

CHUNK = 1 << 18  # the most one read returns: big enough that 1 Gbit/s is ~500 chunks a second
READY = "proxy ready on"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Accept on ``listen`` and forward every connection to ``target`` (both HOST:PORT)."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int

    @classmethod
    def parse(cls, text: str) -> Route:
        """``LHOST:LPORT=THOST:TPORT``; ValueError naming the text otherwise."""
        try:
            listen, target = text.split("=")
            lh, lp = listen.rsplit(":", 1)
            th, tp = target.rsplit(":", 1)
            return cls(listen_host=lh, listen_port=int(lp), target_host=th, target_port=int(tp))
        except ValueError:
            raise ValueError(f"proxy route {text!r} is not LHOST:LPORT=THOST:TPORT") from None

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port}={self.target_host}:{self.target_port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """``delay_s`` one way (half the RTT); ``queue_bytes`` held per direction at most (it must
    cover bandwidth x delay, or the proxy itself caps the throughput); ``pace_s`` the pause
    between reads of a stream (see ``_pipe``); ``bypass`` the source addresses that are local
    to the proxy's host, whose connections get neither delay nor pacing (``for_peer``)."""

    delay_s: float
    queue_bytes: int = 8 << 20
    pace_s: float = 0.001
    bypass: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.queue_bytes < CHUNK:
            raise ValueError(f"proxy delay {self.delay_s} s must be >= 0 and queue "
                             f"{self.queue_bytes} bytes >= {CHUNK}")

    def for_peer(self, peer: tuple | None) -> ProxyConfig:
        """What one connection from ``peer`` (its socket's peername) gets: this config, or
        for a local source no delay and no pacing (a plain copy, as fast as the loop goes)."""
        if peer is not None and peer[0] in self.bypass:
            return replace(self, delay_s=0.0, pace_s=0.0)
        return self


async def _pipe(reader: asyncio.StreamReader, source: asyncio.Transport,
                writer: asyncio.StreamWriter, cfg: ProxyConfig) -> None:
    """Copy ``reader`` to ``writer``, each chunk written ``cfg.delay_s`` after it was read;
    EOF is passed on (half-close) after the same delay.

    Cheap on CPU: after a read that did not fill a chunk, ``source`` (the transport under
    ``reader``) stops reading for ``cfg.pace_s``, so a stream arriving packet by packet (tbf
    paces it) is taken a millisecond at a time, not a packet at a time (a wake-up per packet
    cost a quarter of a core at 100 Mbit/s); and every chunk already due leaves in one write.
    A lone message (a ping, a request) is read the moment it arrives: only a stream's later
    bytes can wait up to ``pace_s`` in the kernel before they are stamped."""
    loop = asyncio.get_running_loop()
    queue: deque[tuple[float, bytes]] = deque()  # (due, chunk), oldest first; b"" is EOF
    held = 0  # bytes queued; reading stops at cfg.queue_bytes until give_out makes room
    arrived, room = asyncio.Event(), asyncio.Event()
    room.set()

    def put(chunk: bytes) -> None:
        nonlocal held
        queue.append((loop.time() + cfg.delay_s, chunk))
        held += len(chunk)
        arrived.set()

    async def take_in() -> None:
        while chunk := await reader.read(CHUNK):
            put(chunk)
            if held >= cfg.queue_bytes:
                room.clear()
                await room.wait()
            if len(chunk) < CHUNK and cfg.pace_s > 0 and not source.is_closing():
                source.pause_reading()
                await asyncio.sleep(cfg.pace_s)
                source.resume_reading()
        put(b"")

    async def give_out() -> None:
        nonlocal held
        while True:
            if not queue:
                arrived.clear()
                await arrived.wait()
            if (wait := queue[0][0] - loop.time()) > 0:
                await asyncio.sleep(wait)
            now, data = loop.time(), []
            while queue and queue[0][0] <= now and queue[0][1]:
                data.append(queue.popleft()[1])
            if data:
                writer.writelines(data)
                await writer.drain()
                held -= sum(map(len, data))
                if held < cfg.queue_bytes:
                    room.set()
            if queue and queue[0][0] <= now and not queue[0][1]:  # EOF, due
                if writer.can_write_eof():
                    writer.write_eof()
                return

    await asyncio.gather(take_in(), give_out())


async def _serve_one(route: Route, cfg: ProxyConfig, down_r: asyncio.StreamReader,
                     down_w: asyncio.StreamWriter) -> None:
    """One accepted connection: dial the target, then both directions until both are done
    or either side fails (a reset closes both ends at once)."""
    peer = down_w.get_extra_info("peername")
    cfg = cfg.for_peer(peer)
    try:
        up_r, up_w = await asyncio.wait_for(
            asyncio.open_connection(route.target_host, route.target_port, limit=CHUNK), 10.0)
    except (OSError, asyncio.TimeoutError) as err:
        log.warning("proxy %s: cannot reach %s:%d for %s: %s", route, route.target_host,
                    route.target_port, peer, err)
        down_w.close()
        return
    tasks = [asyncio.ensure_future(_pipe(down_r, down_w.transport, up_w, cfg)),
             asyncio.ensure_future(_pipe(up_r, up_w.transport, down_w, cfg))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if (err := task.exception()) is not None:  # a reset, a broken pipe
                log.debug("proxy %s: connection from %s ended: %r", route, peer, err)
    finally:
        for task in tasks:
            task.cancel()
        for w in (up_w, down_w):
            w.close()


async def start(routes: list[Route], cfg: ProxyConfig) -> list[asyncio.Server]:
    """Listen on every route; the servers are returned so a caller can read bound ports."""
    servers = []
    for route in routes:
        async def handle(r, w, route=route):
            await _serve_one(route, cfg, r, w)
        servers.append(await asyncio.start_server(handle, route.listen_host, route.listen_port,
                                                  limit=CHUNK))
    return servers


async def _main(routes: list[Route], cfg: ProxyConfig) -> None:
    servers = await start(routes, cfg)
    bound = [f"{r.listen_host}:{s.sockets[0].getsockname()[1]}" for r, s in zip(routes, servers)]
    local = f", none from {','.join(sorted(cfg.bypass))}" if cfg.bypass else ""
    print(f"{READY} {','.join(bound)} (delay {cfg.delay_s * 1000:g} ms each way{local})",
          flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="harness.netbed.proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT / 2)")
    ap.add_argument("--queue-bytes", type=int, default=8 << 20, help="held per direction at most")
    ap.add_argument("--local-bypass", action="append", default=[], metavar="ADDR",
                    help="a source address forwarded without delay (the host's own; repeatable)")
    ap.add_argument("routes", nargs="+", type=Route.parse, help="LHOST:LPORT=THOST:TPORT")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ProxyConfig(delay_s=args.delay_ms / 1000.0, queue_bytes=args.queue_bytes,
                      bypass=frozenset(args.local_bypass))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.routes, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
