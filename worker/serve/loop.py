"""The serving group's loop for one generation: read operations in the coordinator's order,
run each on every rank, post rank 0's result, and keep a replay base per session.

[Note: replay]
A (re-)formed group reads from the coordinator's resume point. A session it has not built yet
is built when its first operation past the session's base arrives: from the base (the newest
clean saved state) or from scratch; operations the base covers are skipped. Operations that
change the weights or the gradients (create, forward_backward, optim_step, load_state) are
always run, finished ones without posting again; pure ones (saves, sampling) that finished are
skipped. So a lost worker costs the operations since the base, never a second application, and
the client sees the one result the first poster left. Bases are saved every ``base_every``
optim steps and by every save_state taken with no gradient pending, and only registered after
that operation's result is posted: a base covering an operation without a result would leave
it unanswered for good (a re-formed group skips what the base covers).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from communication.collectives import CollectiveError
from worker.serve import ops
from worker.serve.channel import ServiceChannel
from worker.serve.session import ServedSession, open_session
from worker.state.catalog import CheckpointError
from worker.train.config import TrainConfig
from zerop2p.requests import BODIES, OperationRecord, SessionRecord

log = logging.getLogger(__name__)

def finite(value):
    """``value`` with every non-finite float as the string pydantic reads back ("nan", "inf",
    "-inf"): JSON has no NaN, and a diverged loss must still reach the client."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


CHECK_EVERY_S = 10.0  # between generation checks while operations keep coming
CHANGES_STATE = frozenset({"create", "forward_backward", "optim_step", "load_state"})
OP_KEYS = 10**12  # operation ids per generation in a collective's key: g<generation><12 digits>


def op_key(generation: int, op_id: int) -> int:
    """The number operation ``op_id``'s collectives are keyed by in ``generation``. Unique
    across generations too: a transport remembers finished keys across generations and drops
    a push for one as a late retry, so a replay re-running the same operation ids under the
    same keys would never hear its peers (every rank waits out the collective timeout)."""
    return generation * OP_KEYS + op_id


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """Where sessions keep their states, and how often a replay base is saved."""

    root: str  # <root>/<session>/{states,sampler,export,replay}
    base_every: int = 10  # optim steps between replay bases
    idle_exit: float | None = None  # leave after this many seconds without an operation


class OperationLoop:
    """One generation's serving: ``run`` until idle for ``config.idle_exit`` (or forever)."""

    def __init__(self, train: TrainConfig, config: ServeConfig, collectives, channel: ServiceChannel,
                 *, generation: int) -> None:
        self.train, self.config = train, config
        self.collectives, self.channel = collectives, channel
        self.generation = generation
        self.rank = collectives.rank
        self.sessions: dict[str, ServedSession] = {}

    def root(self, session_id: str) -> Path:
        return Path(self.config.root) / session_id

    def run(self) -> int:
        after = self.channel.resume()
        idle_since = time.monotonic()
        log.info("rank %d serving from operation %d", self.rank, after)
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked > CHECK_EVERY_S:  # under load too: take a restarted
                self.channel.check_generation()               # worker in, follow a peer's give-up
                checked = time.monotonic()
            nxt = self.channel.next(after)
            if nxt.operation is None:
                self.channel.check_generation()  # a peer lost while idle: re-form now
                checked = time.monotonic()
                if (self.config.idle_exit is not None
                        and time.monotonic() - idle_since > self.config.idle_exit):
                    log.info("rank %d: no operation for %.0fs; leaving", self.rank,
                             self.config.idle_exit)
                    return 0
                continue
            idle_since = time.monotonic()
            after = nxt.operation.id
            self.handle(nxt.operation, nxt.session, nxt.noise_salt)

    def handle(self, op: OperationRecord, record: SessionRecord, salt: str | None = None) -> None:
        served = self.sessions.get(op.session_id)
        finished = op.status in ("done", "failed")
        if served is None:
            base = record.base_seq if record.base_seq is not None else -1
            if op.seq <= base:
                return  # covered by the base this session will be built from
            if base >= 0:
                served = self._build(record)
                if served is None:
                    if self.rank == 0 and not finished:
                        self.channel.finish(op, error=f"session {op.session_id!r}: its replay "
                                                      f"base {record.base_path} is unreadable")
                    return
            elif op.kind != "create":  # its creation failed: nothing to run this on
                if self.rank == 0 and not finished:
                    self.channel.finish(op, error=f"session {op.session_id!r} has no model: "
                                                  "its creation failed")
                return
        elif op.seq <= served.applied:
            return
        if finished and (op.status == "failed" or op.kind not in CHANGES_STATE):
            if served is not None:
                served.applied = op.seq
            return
        if finished:
            log.info("rank %d: replaying %s #%d of %s (finished: not posted again)", self.rank,
                     op.kind, op.seq, op.session_id)
        result, error = self._run(op, record, served, salt)
        if self.rank == 0 and not finished:
            self.channel.finish(op, result=result, error=error)
        if error is not None and op.kind in CHANGES_STATE and op.kind != "create":
            # this rank's slices may be half changed, or another rank's changed and not ours
            raise CollectiveError(f"rank {self.rank}: {op.kind} #{op.seq} of {op.session_id} "
                                  f"failed ({error}); re-forming to replay from the base")
        if error is None:  # only once its result is posted (see the note)
            self._base_after(op, self.sessions[op.session_id], result)

    def _build(self, record: SessionRecord) -> ServedSession | None:
        """A session this generation has not built, from its replay base (None: unreadable)."""
        served = open_session(self.train, record, self.collectives, generation=self.generation)
        try:
            served.load(record.base_path, with_optimizer=True)
        except (CheckpointError, OSError) as err:
            log.error("rank %d: session %s: replay base %s: %s", self.rank, record.session_id,
                      record.base_path, err)
            return None
        served.applied = record.base_seq
        log.info("rank %d: session %s rebuilt from its base (seq %d)", self.rank,
                 record.session_id, record.base_seq)
        self.sessions[record.session_id] = served
        return served

    def _run(self, op: OperationRecord, record: SessionRecord, served: ServedSession | None,
             salt: str | None = None) -> tuple[dict | None, str | None]:
        """Run ``op`` on every rank; (result, None), or (None, why). A lost peer
        (CollectiveError, TimeoutError) propagates: the group re-forms. Ranks agree on success
        in one all-reduce, so a failure on any rank is everyone's (and for an operation that
        changes the state, ``handle`` re-forms the group after posting it)."""
        result, error = self._attempt(op, record, served, salt)
        served = self.sessions.get(op.session_id)
        if op.kind == "create" or served is None:
            return result, error
        failed = served.engine.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))
        if float(failed[0]) > 0:
            return None, error or f"{op.kind} failed on {int(failed[0])} other rank(s)"
        return finite(result), None

    def _attempt(self, op: OperationRecord, record: SessionRecord, served: ServedSession | None,
                 salt: str | None) -> tuple[dict | None, str | None]:
        try:
            if op.kind == "create":
                if served is None:
                    served = open_session(self.train, record, self.collectives,
                                          generation=self.generation)
                    self.sessions[record.session_id] = served
                served.applied = op.seq
                return {"model": served.info.model_dump()}, None
            body = BODIES[op.kind].model_validate(op.body)
            served.begin(op_key(self.generation, op.id))
            result = self._dispatch(op, body, served, salt)
            served.applied = op.seq
            return result, None
        except (CollectiveError, TimeoutError):
            raise
        except (ValueError, CheckpointError, FileNotFoundError, RuntimeError) as err:
            log.error("rank %d: %s #%d of %s failed: %s", self.rank, op.kind, op.seq,
                      op.session_id, err)
            if served is not None:
                served.applied = op.seq
            return None, f"{type(err).__name__}: {err}"

    def _dispatch(self, op: OperationRecord, body, served: ServedSession,
                  salt: str | None) -> dict:
        root = self.root(op.session_id)
        if op.kind == "forward_backward":
            return ops.forward_backward(served, body)
        if op.kind == "forward":
            return ops.forward_backward(served, body, backward=False)
        if op.kind == "optim_step":
            return ops.optim_step(served, body, noise_seed=ops.noise_seed(salt, op))
        if op.kind == "save_state":
            return ops.save_state(served, body, root, op.seq)
        if op.kind == "save_weights_for_sampler":
            return ops.save_for_sampler(served, body, root)
        if op.kind == "load_state":
            return ops.load_state(served, body)
        if op.kind == "sample":
            return ops.sample(served, body, op.seq)
        return ops.compute_logprobs(served, body)

    def _base_after(self, op: OperationRecord, served: ServedSession, result: dict) -> None:
        """A replay base after ``op``, if it makes one: every ``base_every`` optim steps (a
        save on every rank), or the state a save_state with no gradient pending just wrote. A
        base that cannot be saved is logged: replays then start from the previous one."""
        try:
            if op.kind == "optim_step" and served.progress.step % self.config.base_every == 0:
                self._base(served, ops.save_base(served, self.root(op.session_id), op.seq), op.seq)
            elif op.kind == "save_state" and not served.dirty:
                self._base(served, Path(result["path"]) if self.rank == 0 else None, op.seq)
        except (CheckpointError, OSError) as err:
            log.error("rank %d: no replay base after %s #%d of %s: %s", self.rank, op.kind,
                      op.seq, op.session_id, err)

    def _base(self, served: ServedSession, path: Path | None, seq: int) -> None:
        if self.rank == 0:
            self.channel.set_base(served.session_id, seq=seq, path=str(path.resolve()))
