"""The training service's rules: sessions, their ordered operations, results, long-polls.

[Note: operations]
A client numbers its calls (seq 1, 2, ...; seq 0 is the session's creation) and posts them in
order; a POST repeating a seq with the same body is a retry and answers the stored record, with
another body it is refused (409). Workers read operations in one global order (``id``) with
``GET /service/next`` and the first result posted for one wins, so a lost POST, a lost answer
or a replaying group never applies or reports an operation twice. Taking an operation makes it
uncancellable: every rank of a group then sees it. Bodies are validated against the model the
workers reported building (vocabulary, positions) before they are queued.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from coordinator.config import MAX_WAIT_S
from coordinator.errors import describe
from coordinator.service import Refusal
from coordinator.session_store import SessionStore, digest
from zerop2p.requests import (
    BODIES,
    FINISHED,
    BaseRequest,
    ModelInfo,
    NextOperation,
    OperationRecord,
    OperationRequest,
    ResultRequest,
    SessionRecord,
    SessionRequest,
)

log = logging.getLogger(__name__)

NEEDS_MODEL = ("forward_backward", "forward", "sample", "compute_logprobs")


def _check_tokens(where: str, tokens: list[int], model: ModelInfo) -> None:
    for i, t in enumerate(tokens):
        if not 0 <= t < model.vocab_size:
            raise Refusal(422, f"{where}: token {t} at index {i} is outside the vocabulary "
                               f"(0..{model.vocab_size - 1})")


def check_body(kind: str, body: dict, model: ModelInfo | None) -> dict:
    """``body`` validated for ``kind`` (422 naming the field) and against ``model``."""
    try:
        parsed = BODIES[kind].model_validate(body)
    except ValidationError as exc:
        raise Refusal(422, f"{kind}: {describe(list(exc.errors()))}") from None
    if kind in NEEDS_MODEL and model is None:
        raise Refusal(409, f"{kind}: the session's model is not built yet (wait for its "
                           "creation to finish)")
    if kind in ("forward_backward", "forward"):
        for i, d in enumerate(parsed.data):
            if d.model_input.length > model.max_positions:
                raise Refusal(422, f"data[{i}].model_input: {d.model_input.length} tokens exceed "
                                   f"the model's {model.max_positions} positions")
            _check_tokens(f"data[{i}].model_input", d.model_input.to_ints(), model)
            _check_tokens(f"data[{i}].loss_fn_inputs.target_tokens", d.targets(), model)
    elif kind in ("sample", "compute_logprobs"):
        if parsed.prompt.length == 0:
            raise Refusal(422, "prompt: it has no tokens")
        _check_tokens("prompt", parsed.prompt.to_ints(), model)
        extra = parsed.sampling_params.max_tokens if kind == "sample" else 0
        if parsed.prompt.length + extra > model.max_positions:
            raise Refusal(422, f"prompt: {parsed.prompt.length} tokens + {extra} to sample "
                               f"exceed the model's {model.max_positions} positions")
    return parsed.model_dump(mode="json")


class Sessions:
    """Answers the /service routes; waiters sleep on one change event."""

    def __init__(self, rows: SessionStore, *, max_wait: float = MAX_WAIT_S) -> None:
        self.rows = rows
        self.max_wait = max_wait
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, probe, wait: float):
        """``probe()`` now and at every change until it is truthy or ``wait`` s pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), self.max_wait)
        while True:
            changed = self._changed
            answer = probe()
            remaining = deadline - loop.time()
            if answer or remaining <= 0:
                return answer
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return probe()

    def session(self, session_id: str) -> SessionRecord:
        record = self.rows.session(session_id)
        if record is None:
            raise Refusal(404, f"unknown session {session_id!r}: create it first "
                               "(POST /service/sessions)")
        return record

    def create(self, request: SessionRequest) -> SessionRecord:
        problem = request.source_problem()
        if problem:
            raise Refusal(409, f"session {request.session_id!r}: {problem}")
        if not self.rows.create(request):
            known = self.session(request.session_id)
            if known.config != request:
                raise Refusal(409, f"session {request.session_id!r} exists with another "
                                   f"configuration ({known.config.model_dump()})")
        else:
            log.info("session %s created: %s", request.session_id, request.model_dump())
            self._notify()
        return self.session(request.session_id)

    def submit(self, session_id: str, request: OperationRequest) -> OperationRecord:
        """Queue operation ``request.seq`` (or answer the stored one, for a retry)."""
        session = self.session(session_id)
        body = check_body(request.kind, request.body, session.model)
        stored = self.rows.op_digest(session_id, request.seq)
        if stored is not None:
            if stored != digest(body):
                raise Refusal(409, f"session {session_id!r}: seq {request.seq} already holds "
                                   "another operation; number each call once")
            return self.rows.operation(session_id, request.seq)
        if not self.rows.append(session_id, request.seq, request.kind, body):
            raise Refusal(409, f"session {session_id!r}: seq {request.seq} is not the next "
                               f"one (expected {self.session(session_id).last_seq + 1})")
        self._notify()
        return self.rows.operation(session_id, request.seq)

    def _record(self, session_id: str, seq: int) -> OperationRecord:
        record = self.rows.operation(session_id, seq)
        if record is None:
            raise Refusal(404, f"session {session_id!r} has no operation {seq}")
        return record

    async def wait(self, session_id: str, seq: int, wait: float) -> OperationRecord:
        """The operation's record once finished, or as it is after ``wait`` s."""
        self._record(session_id, seq)

        def finished():
            record = self.rows.operation(session_id, seq)
            return record if record.status in FINISHED else None
        return await self._until(finished, wait) or self._record(session_id, seq)

    def cancel(self, session_id: str, seq: int) -> OperationRecord:
        record = self._record(session_id, seq)
        if not self.rows.cancel(session_id, seq):
            raise Refusal(409, f"session {session_id!r}: operation {seq} is {record.status}; "
                               "only a queued one can be cancelled")
        self._notify()
        return self._record(session_id, seq)

    async def next(self, after: int, wait: float) -> NextOperation:
        """For workers: the next operation after id ``after`` (taken), with its session."""
        op = await self._until(lambda: self.rows.take_next(after), wait)
        if op is None:
            return NextOperation(operation=None)
        return NextOperation(operation=op, session=self.session(op.session_id),
                             noise_salt=self.rows.noise_salt(op.session_id))

    def _check_poster(self, worker_id: str, generation: int) -> None:
        """Only a member of an active generation (the serving group) posts results and bases:
        a late post from a group that has since re-formed, or from anyone else, is refused."""
        active = {g.generation: g for g in self.rows.store.active_generations()}
        gen = active.get(generation)
        if gen is None or not gen.has(worker_id):
            raise Refusal(409, f"{worker_id!r} is not a member of an active generation "
                               f"{generation}: only the serving group posts results and bases")

    def finish(self, op_id: int, request: ResultRequest) -> OperationRecord:
        record = self.rows.operation_by_id(op_id)
        if record is None:
            raise Refusal(404, f"no operation with id {op_id}")
        if (request.result is None) == (request.error is None):
            raise Refusal(409, "result: give exactly one of result and error")
        self._check_poster(request.worker_id, request.generation)
        if self.rows.finish(op_id, result=request.result, error=request.error):
            log.info("operation %d (%s #%d, %s) %s by %s", op_id, record.session_id, record.seq,
                     record.kind, "failed" if request.error else "done", request.worker_id)
            self._notify()
        return self.rows.operation_by_id(op_id)

    def set_base(self, session_id: str, request: BaseRequest) -> SessionRecord:
        self.session(session_id)
        self._check_poster(request.worker_id, request.generation)
        self.rows.set_base(session_id, request.seq, request.path)
        return self.session(session_id)
