"""The worker's async HTTP client for the coordinator: membership, barrier, outer rounds,
telemetry.

Bodies are built and answers read with the coordinator's own pydantic schemas
(``coordinator/models.py``, the HTTP contract), so the contract is written once.

Every request has a deadline. Connection errors, timeouts and 502/503/504 are retried with
capped exponential backoff and jitter until ``retry_for`` runs out, so a coordinator restart
is ridden out; any other 4xx/5xx raises ``CoordinatorError`` with the server's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

import aiohttp
from pydantic import BaseModel, ValidationError

from coordinator.models import (
    DecidedRound,
    HeartbeatRequest,
    ReadyResponse,
    RegisterRequest,
    RoundRequest,
    RoundResponse,
    TelemetryRequest,
)
from coordinator.progress_models import ProgressRequest, peer_fields
from worker.membership.views import (  # re-exported: the client's answers
    DEFAULT_SITE,
    Generation,
    IslandInfo,
    PeerInfo,
    RoundInfo,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
WAIT_CHUNK_S = 30.0  # one long-poll's length; the server caps it at 60 s
REQUEST_TIMEOUT_S = 10.0  # one HTTP request, unless told otherwise


class CoordinatorError(RuntimeError):
    """The coordinator refused a request (``status`` is the HTTP status), or could not be
    reached before the deadline (``status`` is None)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"coordinator: {status or 'unreachable'}: {message}")
        self.status = status
        self.message = message


def _body(schema: type[BaseModel], *, keep_none: bool = False, **fields: Any) -> dict:
    """A request body validated by the coordinator's schema; a refusal names the field, as
    the coordinator's 422 would, without a round trip."""
    try:
        return schema(**fields).model_dump(exclude_none=not keep_none)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in exc.errors())
        raise CoordinatorError(422, f"{schema.__name__} refused before sending: "
                                    f"{problems}") from None


def _generation(answer: dict, worker_id: str, site: str) -> Generation | None:
    """This worker's view of ``site``'s ready answer, or None if it is not a member."""
    ready = ReadyResponse.model_validate(answer)
    if not ready.ready:
        return None
    peers = sorted((PeerInfo(p.worker_id, p.ip_address, p.port, p.rank) for p in ready.workers),
                   key=lambda p: p.rank)
    mine = [p.rank for p in peers if p.worker_id == worker_id]
    if not mine:
        return None
    return Generation(generation=ready.generation, rank=mine[0], world_size=len(peers),
                      peers=peers, site=site)


def _round(answer: RoundResponse) -> RoundInfo:
    return RoundInfo(round=answer.round, islands=[
        IslandInfo(site=i.site, generation=i.generation, joining=i.joining,
                   members=[PeerInfo(m.worker_id, m.ip_address, m.port, m.rank)
                            for m in i.members]) for i in answer.islands])


class CoordinatorClient:
    """One worker's session with the coordinator at ``url`` (use from one event loop)."""

    def __init__(self, url: str, *, token: str | None = None, worker_id: str,
                 request_timeout: float = REQUEST_TIMEOUT_S, max_backoff: float = 5.0,
                 retry_for: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.worker_id = worker_id
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        self.retry_for = retry_for
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._registration: dict[str, Any] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def _request(self, method: str, path: str, *, body: Any = None,
                       params: dict | None = None, timeout: float | None = None,
                       retry_for: float | None = None) -> Any:
        """One call with retries on transient failures; returns the decoded JSON body."""
        timeout = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + (self.retry_for if retry_for is None else retry_for)
        attempt = 0
        while True:
            try:
                async with self._http().request(
                        method, self.url + path, json=body, params=params,
                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    if resp.status < 400:
                        return await resp.json()
                    message = await _detail(resp)
                    if resp.status not in RETRY_STATUSES:
                        raise CoordinatorError(resp.status, message)
                    problem: str = f"{resp.status}: {message}"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    asyncio.TimeoutError) as exc:  # a coordinator killed mid-response
                problem = f"{type(exc).__name__}: {exc}"
            delay = self._backoff(attempt)
            if time.monotonic() + delay > deadline:
                raise CoordinatorError(None, f"{method} {self.url}{path} failed for "
                                             f"{attempt + 1} attempts: {problem}")
            if attempt == 0:
                log.warning("coordinator %s %s: %s; retrying", method, path, problem)
            attempt += 1
            await asyncio.sleep(delay)

    @property
    def site(self) -> str:
        """The site this worker registered in (the default site before it registered)."""
        return (self._registration or {}).get("site", DEFAULT_SITE)

    def _backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1``: capped, exponential, jittered."""
        return min(self.max_backoff, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0)

    async def register(self, ip_address: str, port: int, *, retry_for: float | None = None,
                       **info: Any) -> dict:
        """Register (or re-register) this worker's gRPC address and capacity."""
        self._registration = _body(RegisterRequest, worker_id=self.worker_id,
                                   ip_address=ip_address, port=port, **info)
        return await self._request("POST", "/workers/register", body=self._registration,
                                   retry_for=retry_for)

    async def heartbeat(self, *, retry_for: float | None = None, **status: Any) -> dict:
        """Heartbeat with optional status; re-registers if the coordinator forgot us (404)
        or declared us dead (409) while this process is in fact alive."""
        body = _body(HeartbeatRequest, **status)
        path = f"/workers/{self.worker_id}/heartbeat"
        try:
            return await self._request("POST", path, body=body, retry_for=retry_for)
        except CoordinatorError as exc:
            if exc.status not in (404, 409) or self._registration is None:
                raise
            log.warning("coordinator does not count %s as alive (%s); registering again",
                        self.worker_id, exc.message)
        await self._request("POST", "/workers/register", body=self._registration,
                            retry_for=retry_for)
        return await self._request("POST", path, body=body, retry_for=retry_for)

    async def leave(self, *, retry_for: float | None = None) -> dict:
        """Leave gracefully (the generation this worker is in ends)."""
        return await self._request("DELETE", f"/workers/{self.worker_id}", retry_for=retry_for)

    async def report_telemetry(self, *, retry_for: float | None = None, links: Any = (),
                               **metrics: Any) -> dict:
        """Send one row of numeric metrics (flags travel as 0/1: the route takes numbers only);
        ``links`` (``rank``, ``rtt_s``, ``send_bytes_per_s``) add ``peer_fields``, slowest first."""
        numbers = {k: int(v) if isinstance(v, bool) else v for k, v in metrics.items()}
        numbers.update(peer_fields(links, used=len(numbers) + 1))  # + worker_id
        return await self._request("POST", "/telemetry",
                                   body=_body(TelemetryRequest, keep_none=True,
                                              worker_id=self.worker_id, **numbers),
                                   retry_for=retry_for)

    async def report_progress(self, *, retry_for: float | None = None, **fields: Any) -> dict:
        """Where this worker's trainer is and what it waits for (``ProgressRequest``)."""
        return await self._request("POST", "/training/progress",
                                   body=_body(ProgressRequest, worker_id=self.worker_id, **fields),
                                   retry_for=retry_for)

    async def wait_ready(self, min_workers: int, *, timeout: float,
                         after_generation: int | None = None) -> Generation:
        """Long-poll this worker's site's barrier until a generation (newer than
        ``after_generation``, if given) includes this worker; TimeoutError after ``timeout``
        seconds (the last poll may end up to one request timeout later).

        Each poll asks the server to hold it for at most the time left, so the loop retries
        unreachable coordinators itself: a retry inside ``_request`` would resend a stale wait
        and could overrun the deadline by a whole poll."""
        deadline = time.monotonic() + timeout
        answer: dict = {"active_workers": 0}
        attempt = 0
        site = self.site
        while (remaining := deadline - time.monotonic()) > 0:
            chunk = min(remaining, WAIT_CHUNK_S)
            params = {"min_workers": min_workers, "worker_id": self.worker_id,
                      "wait": f"{chunk:.3f}", "site": site}
            if after_generation is not None:
                params["after"] = after_generation
            try:
                answer = await self._request("GET", "/training/ready", params=params,
                                             timeout=chunk + self.request_timeout, retry_for=0.0)
            except CoordinatorError as exc:
                delay = self._backoff(attempt)
                if exc.status is not None or time.monotonic() + delay >= deadline:
                    raise  # a refusal, or unreachable until the deadline
                if attempt == 0:
                    log.warning("coordinator barrier: %s; retrying", exc.message)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            gen = _generation(answer, self.worker_id, site)
            if gen is not None and (after_generation is None or gen.generation > after_generation):
                return gen
        where = "" if site == DEFAULT_SITE else f" of site {site}"
        raise TimeoutError(
            f"{self.worker_id}: barrier for {min_workers} workers{where} not met within "
            f"{timeout:.1f}s ({answer.get('active_workers', 0)} alive, generation "
            f"{answer.get('generation')})")

    async def outer_round(self, round: int, *, site: str, generation: int, joining: bool,
                          islands: int, quorum_timeout: float, timeout: float) -> RoundInfo:
        """Arrive at outer round ``round`` for ``site``'s ``generation`` and long-poll until
        the coordinator decides it (``islands`` sites arrived, or ``quorum_timeout`` s passed
        since the first did); TimeoutError after ``timeout`` s naming the sites that had
        arrived. A refusal (409: not a member of that generation, a round out of turn) raises
        ``CoordinatorError``. The round may be decided without ``site``: see
        ``RoundInfo.island``. Unreachable coordinators are retried here, as in ``wait_ready``.
        """
        deadline = time.monotonic() + timeout
        arrived: list[str] | None = None
        attempt = 0
        while (remaining := deadline - time.monotonic()) > 0:
            chunk = min(remaining, WAIT_CHUNK_S)
            body = _body(RoundRequest, worker_id=self.worker_id, site=site,
                         generation=generation, joining=joining, islands=islands,
                         quorum_timeout=quorum_timeout, wait=chunk)
            try:
                raw = await self._request("POST", f"/islands/rounds/{round}", body=body,
                                          timeout=chunk + self.request_timeout, retry_for=0.0)
            except CoordinatorError as exc:
                delay = self._backoff(attempt)
                if exc.status is not None or time.monotonic() + delay >= deadline:
                    raise
                if attempt == 0:
                    log.warning("coordinator outer round %d: %s; retrying", round, exc.message)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            answer = RoundResponse.model_validate(raw)
            if answer.decided:
                return _round(answer)
            arrived = [i.site for i in answer.islands]
        known = "unknown" if arrived is None else (", ".join(arrived) or "none")
        raise TimeoutError(
            f"{self.worker_id}: outer round {round} for site {site} (generation {generation}) "
            f"not decided within {timeout:.1f}s; {islands} islands expected, arrived: {known}")

    async def last_round(self, *, retry_for: float | None = None) -> int:
        """The newest decided outer round (0 if none)."""
        raw = await self._request("GET", "/islands/rounds", params={"limit": 1},
                                  retry_for=retry_for)
        rows = [DecidedRound.model_validate(r) for r in raw]
        return rows[-1].round if rows else 0


async def _detail(resp: aiohttp.ClientResponse) -> str:
    """The server's ``detail`` message, or the raw body."""
    text = await resp.text()
    try:
        detail = json.loads(text).get("detail")
        return detail if isinstance(detail, str) else text
    except (ValueError, AttributeError):
        return text[:500]
