"""What usually breaks a cluster, checked one by one: a peer port that cannot be bound or
reached, a token the coordinator refuses, a clock far from the coordinator's, slow or dead
links to peers. Each check is a ``Check`` with a status: ``ok``, ``warn`` (worth knowing, not a
failure), ``fail`` (the doctor's verdict fails) or ``skip``."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import secrets
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import grpc

from communication.grpc_transport import GrpcTransport
from communication.peer_client import PeerCallError, PeerClient

HTTP_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 3.0
CLOCK_WARN_S = 2.0  # past this the coordinator's timestamps and a worker's disagree visibly
CLOCK_FAIL_S = 60.0  # certificates it issues may not be valid yet on a clock this far behind


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    name: str
    status: str  # ok, warn, fail, skip
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail}


def _get(url: str, token: str | None, ca: str | None) -> tuple[int, dict, bytes, float, float]:
    """GET ``url`` with the bearer token: (status, headers, body, sent at, answered at);
    urllib.error.URLError when nothing answered."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    context = ssl.create_default_context(cafile=ca) if url.startswith("https") else None
    sent = time.time()
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read(), sent, time.time()
    except urllib.error.HTTPError as err:  # an answer all the same: 401, 403, ...
        return err.code, dict(err.headers), err.read(), sent, time.time()


def get_json(url: str, token: str | None, ca: str | None = None):
    """The JSON body of an authenticated GET; RuntimeError naming the status otherwise."""
    status, _, body, _, _ = _get(url, token, ca)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


def clock_check(headers: dict, sent: float, answered: float) -> Check:
    """Skew of the local clock to the coordinator's, from its ``Date`` header (whole seconds:
    the server's time lies in [Date, Date + 1), read between ``sent`` and ``answered``)."""
    date = headers.get("date") or headers.get("Date")
    if not date:
        return Check(name="clock skew", status="skip", detail="the coordinator sent no Date header")
    server = email.utils.parsedate_to_datetime(date).timestamp() + 0.5
    skew = server - (sent + answered) / 2
    margin = 0.5 + (answered - sent) / 2
    beyond = abs(skew) - margin
    status = "ok" if beyond <= CLOCK_WARN_S else "warn" if beyond <= CLOCK_FAIL_S else "fail"
    side = "ahead of" if skew > 0 else "behind"
    return Check(name="clock skew", status=status,
                 detail=f"the coordinator is {abs(skew):.1f} s {side} this machine (+-{margin:.1f} s, "
                        f"from its Date header; warn past {CLOCK_WARN_S:g} s, fail past "
                        f"{CLOCK_FAIL_S:g} s)")


def coordinator_checks(url: str, token: str | None, *, ca: str | None = None) -> list[Check]:
    """Token accepted (and a wrong one refused), and the clock skew, at coordinator ``url``."""
    try:
        status, headers, body, sent, answered = _get(f"{url}/workers", token, ca)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return [Check(name="coordinator", status="fail", detail=f"{url} did not answer: {reason}")]
    if status != 200:
        token_check = Check(name="token", status="fail",
                            detail=f"{url} refused the token: HTTP {status} {body[:120]!r}")
    else:
        wrong = _get(f"{url}/workers", f"doctor-{secrets.token_hex(8)}", ca)[0]
        if wrong in (401, 403):
            token_check = Check(name="token", status="ok",
                                detail=f"accepted by {url} (a wrong token gets HTTP {wrong})")
        else:
            token_check = Check(name="token", status="warn",
                                detail=f"{url} also answers a wrong token (HTTP {wrong}): it "
                                       "runs without one, anyone may register")
    return [token_check, clock_check(headers, sent, answered)]


async def _ping_twice(client: PeerClient) -> float:
    """Round trip of the second Ping (the first also opens the connection)."""
    await client.ping(0, -1, timeout=PING_TIMEOUT_S)
    start = time.perf_counter()
    await client.ping(0, -1, timeout=PING_TIMEOUT_S)
    return time.perf_counter() - start


def port_check(host: str, port: int, token: str | None) -> Check:
    """A peer server can be bound at ``host:port`` and answers a Ping; a wrong token is refused."""
    try:
        transport = GrpcTransport(host=host, port=port, token=token)
    except Exception as err:  # noqa: BLE001 - any bind failure is this check's finding
        return Check(name="peer port", status="fail", detail=f"cannot bind {host}:{port}: {err}")

    async def probe() -> tuple[float, bool]:
        rtt = await _ping_twice(transport.client(transport.address))
        stranger = PeerClient(transport.address, token=f"doctor-{secrets.token_hex(8)}")
        try:
            await stranger.ping(0, -1, timeout=PING_TIMEOUT_S)
            return rtt, False
        except PeerCallError as err:
            return rtt, err.code == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await stranger.close()

    auth_log = logging.getLogger("communication.auth")  # it warns of the stranger, rightly
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        rtt, refused = transport.call(probe(), timeout=4 * PING_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - bound but not reachable: the finding
        return Check(name="peer port", status="fail",
                     detail=f"bound {transport.address} but a Ping to it failed: {err}")
    finally:
        auth_log.setLevel(level)
        transport.close()
    guard = "a wrong token is refused" if refused else (
        "no token: anyone reaching the port may push" if not token else "a wrong token got in")
    return Check(name="peer port", status="ok" if refused or not token else "fail",
                 detail=f"{transport.address} bound; Ping answered in {rtt * 1e3:.2f} ms; {guard}")


def links_from_telemetry(rows: list[dict], world_size: int) -> list[Check]:
    """Each rank's latest round trip and send rate to every peer, as its transport measured
    them during the sharded run (``peer<r>_rtt_ms``, ``peer<r>_send_mb_s`` telemetry)."""
    seen: dict[tuple[int, int], dict[str, float]] = {}
    for row in rows:  # oldest first: later rows overwrite
        metrics = row.get("metrics", {})
        rank = metrics.get("rank")
        for peer in range(world_size):
            for kind in ("rtt_ms", "send_mb_s"):
                value = metrics.get(f"peer{peer}_{kind}")
                if rank is not None and value is not None:
                    seen.setdefault((int(rank), peer), {})[kind] = value
    checks = []
    for rank in range(world_size):
        parts, unmeasured = [], []
        for peer in range(world_size):
            if peer == rank:
                continue
            link = seen.get((rank, peer))
            if not link:
                unmeasured.append(str(peer))
                continue
            rtt = f"rtt {link['rtt_ms']:.2f} ms" if "rtt_ms" in link else "rtt -"
            rate = f"send {link['send_mb_s']:.1f} MB/s" if "send_mb_s" in link else "send -"
            parts.append(f"-> {peer}: {rtt}, {rate}")
        if unmeasured:
            parts.append(f"-> {','.join(unmeasured)}: not measured")
        checks.append(Check(name=f"links rank {rank}", status="warn" if unmeasured else "ok",
                            detail="; ".join(parts) or "no peers"))
    return checks


def remote_peer_checks(url: str, token: str | None, *, ca: str | None = None) -> list[Check]:
    """Ping every alive worker registered at coordinator ``url`` on its peer address."""
    if url.startswith("https"):
        return [Check(name="peers", status="skip", detail="an https coordinator's workers talk "
                      "mutual TLS: pinging them needs a worker identity")]
    try:
        workers = [w for w in get_json(f"{url}/workers", token, ca) if w["status"] == "alive"]
    except (RuntimeError, urllib.error.URLError, OSError, ValueError) as err:
        return [Check(name="peers", status="skip", detail=f"workers not listed: {err}")]
    if not workers:
        return [Check(name="peers", status="skip", detail=f"no alive worker at {url}")]

    async def one(worker: dict) -> Check:
        address = f"{worker['ip_address']}:{worker['port']}"
        client = PeerClient(address, token=token)
        try:
            rtt = await _ping_twice(client)
            return Check(name=f"peer {worker['worker_id']}", status="ok",
                         detail=f"{address}: Ping answered in {rtt * 1e3:.2f} ms")
        except PeerCallError as err:
            return Check(name=f"peer {worker['worker_id']}", status="fail",
                         detail=f"{address}: {err}")
        finally:
            await client.close()

    async def every() -> list[Check]:
        return list(await asyncio.gather(*(one(w) for w in workers)))

    return asyncio.run(every())
