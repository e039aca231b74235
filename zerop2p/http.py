"""The client's HTTP: a deadline on every request, retries with capped exponential backoff and
jitter on connection errors, timeouts and 502/503/504 (a coordinator restart is ridden out),
and any other refusal raised as ``ServiceError`` with the server's message."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import httpx

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
REQUEST_TIMEOUT_S = 30.0  # one request, beyond any long-poll it asks the server for


class ServiceError(RuntimeError):
    """The service refused a request (``status``), or was unreachable (``status`` None), or an
    operation failed on the workers."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"zerop2p service: {status or 'unreachable'}: {message}")
        self.status = status
        self.message = message


class OperationFailedError(ServiceError):
    """An operation ran on the workers and failed there (the message is theirs)."""

    def __init__(self, message: str) -> None:
        RuntimeError.__init__(self, f"zerop2p operation failed: {message}")
        self.status = None
        self.message = message


def _answer(response: httpx.Response, method: str, path: str) -> Any:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ServiceError(response.status_code, f"{method} {path}: {detail}")
    return response.json()


class Http:
    """Requests to ``base_url`` with the bearer ``token``; ``retry_for`` s of retries."""

    def __init__(self, base_url: str, *, token: str | None = None, retry_for: float = 120.0,
                 max_backoff: float = 5.0, verify: str | bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_for = retry_for
        self.max_backoff = max_backoff
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sync = httpx.Client(base_url=self.base_url, headers=headers, verify=verify)
        self._async_args = {"base_url": self.base_url, "headers": headers, "verify": verify}

    def close(self) -> None:
        self._sync.close()

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff, 0.1 * 2 ** attempt) * (0.5 + random.random() / 2)

    def _retryable(self, method: str, path: str, error: Exception | int, start: float,
                   attempt: int, retry_for: float | None) -> float:
        """Seconds to sleep before the next try; raises when the retries are spent."""
        retry_for = self.retry_for if retry_for is None else retry_for
        if time.monotonic() - start > retry_for:
            raise ServiceError(None, f"{method} {path}: no answer from {self.base_url} for "
                                     f"{retry_for:.0f}s (last: {error})")
        delay = self._backoff(attempt)
        log.debug("%s %s: %s; retrying in %.2fs", method, path, error, delay)
        return delay

    def request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                timeout: float = REQUEST_TIMEOUT_S, retry_for: float | None = None) -> Any:
        start, attempt = time.monotonic(), 0
        while True:
            try:
                response = self._sync.request(method, path, json=json, params=params,
                                              timeout=timeout)
                if response.status_code not in RETRY_STATUSES:
                    return _answer(response, method, path)
                error: Exception | int = response.status_code
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                error = exc
            time.sleep(self._retryable(method, path, error, start, attempt, retry_for))
            attempt += 1

    async def arequest(self, method: str, path: str, *, json: Any = None,
                       params: dict | None = None, timeout: float = REQUEST_TIMEOUT_S,
                       retry_for: float | None = None) -> Any:
        start, attempt = time.monotonic(), 0
        async with httpx.AsyncClient(**self._async_args) as client:
            while True:
                try:
                    response = await client.request(method, path, json=json, params=params,
                                                    timeout=timeout)
                    if response.status_code not in RETRY_STATUSES:
                        return _answer(response, method, path)
                    error: Exception | int = response.status_code
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    error = exc
                await asyncio.sleep(self._retryable(method, path, error, start, attempt,
                                                    retry_for))
                attempt += 1
