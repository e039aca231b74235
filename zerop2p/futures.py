"""``APIFuture``: the result of one queued operation, awaited by long-polls with a deadline.

``.result(timeout)`` blocks, ``await future`` does not; both read the same record, so a
future may be awaited twice, and the parsed result is kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any, Generic, TypeVar

from zerop2p.http import Http, OperationFailedError, ServiceError

T = TypeVar("T")
POLL_S = 30.0  # one long-poll's length (the server holds a request up to 60 s)


class APIFuture(Generic[T]):
    """Operation ``seq`` of ``session_id``; ``parse`` turns its result into the return type."""

    def __init__(self, http: Http, session_id: str, seq: int, kind: str,
                 parse: Callable[[dict], T]) -> None:
        self.http, self.session_id, self.seq, self.kind = http, session_id, seq, kind
        self._parse = parse
        self._record: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"APIFuture({self.kind} #{self.seq} of {self.session_id})"

    @property
    def _path(self) -> str:
        return f"/service/sessions/{self.session_id}/ops/{self.seq}"

    def _finish(self, record: dict) -> bool:
        """Keep ``record`` if the operation has finished; whether it has."""
        if record["status"] in ("queued", "running"):
            return False
        self._record = record
        return True

    def _value(self) -> T:
        record = self._record
        if record["status"] == "cancelled":
            raise CancelledError(f"{self.kind} #{self.seq} of {self.session_id} was cancelled")
        if record["status"] == "failed":
            raise OperationFailedError(f"{self.kind} #{self.seq} of {self.session_id}: "
                                       f"{record['error']}")
        return self._parse(record["result"])

    def _remaining(self, deadline: float | None, first: bool) -> float:
        """The next long-poll's length; the first poll always runs (``result(0)`` looks)."""
        if deadline is None:
            return POLL_S
        left = deadline - time.monotonic()
        if left <= 0 and not first:
            raise TimeoutError(f"{self.kind} #{self.seq} of {self.session_id}: no result "
                               "before the deadline")
        return min(max(left, 0.0), POLL_S)

    def _retry_for(self, deadline: float | None) -> float | None:
        """Connection retries end with the caller's deadline (None: the client's own)."""
        return None if deadline is None else max(deadline - time.monotonic(), 1.0)

    def _polls(self, timeout: float | None):
        """The keyword arguments of each long-poll until ``timeout`` s pass (the first poll
        always runs, so ``result(0)`` looks once); the sync and async waits share them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        first = True
        while True:
            wait = self._remaining(deadline, first)
            first = False
            yield {"params": {"wait": wait}, "timeout": wait + 30,
                   "retry_for": self._retry_for(deadline)}

    def result(self, timeout: float | None = None) -> T:
        """The operation's result; raises OperationFailedError if it failed, CancelledError if
        it was cancelled, TimeoutError after ``timeout`` s."""
        if self._record is None:
            for poll in self._polls(timeout):
                if self._finish(self.http.request("GET", self._path, **poll)):
                    break
        return self._value()

    async def result_async(self, timeout: float | None = None) -> T:
        if self._record is None:
            for poll in self._polls(timeout):
                if self._finish(await self.http.arequest("GET", self._path, **poll)):
                    break
        return self._value()

    def __await__(self):
        return self.result_async().__await__()

    def done(self) -> bool:
        """Whether the operation has finished (one short request unless known)."""
        return self._record is not None or self._finish(self.http.request("GET", self._path))

    def cancel(self) -> bool:
        """Cancel the operation if no worker has taken it yet; False otherwise."""
        try:
            self._record = self.http.request("DELETE", self._path)
        except ServiceError as err:
            if err.status != 409:
                raise
            record = self.http.request("GET", self._path)  # a retried DELETE may have won
            self._finish(record)
            return record["status"] == "cancelled"
        return True


async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking client call off the event loop (the ``_async`` twins of submissions)."""
    return await asyncio.to_thread(call, *args, **kwargs)
