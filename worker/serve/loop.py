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
optim steps and by every save_state taken with no gradient pending.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from communication.collectives import CollectiveError
from worker.serve import ops
from worker.serve.channel import ServiceChannel
from worker.serve.session import ServedSession, open_session
from worker.state.catalog import CheckpointError
from worker.train.config import TrainConfig
from zerop2p.requests import BODIES, OperationRecord, SessionRecord

log = logging.getLogger(__name__)

CHANGES_STATE = frozenset({"create", "forward_backward", "optim_step", "load_state"})


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
        while True:
            nxt = self.channel.next(after)
            if nxt.operation is None:
                self.channel.check_generation()  # a peer lost while idle: re-form now
                if (self.config.idle_exit is not None
                        and time.monotonic() - idle_since > self.config.idle_exit):
                    log.info("rank %d: no operation for %.0fs; leaving", self.rank,
                             self.config.idle_exit)
                    return 0
                continue
            idle_since = time.monotonic()
            after = nxt.operation.id
            self.handle(nxt.operation, nxt.session)

    def handle(self, op: OperationRecord, record: SessionRecord) -> None:
        served = self.sessions.get(op.session_id)
        finished = op.status in ("done", "failed")
        if served is None:
            base = record.base_seq if record.base_seq is not None else -1
            if op.seq <= base:
                return  # covered by the base this session will be built from
            if base >= 0:
                served = self._build(record)
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
        result, error = self._run(op, record, served)
        if self.rank == 0 and not finished:
            self.channel.finish(op, result=result, error=error)

    def _build(self, record: SessionRecord) -> ServedSession:
        """A session this generation has not built, from its replay base."""
        served = open_session(self.train, record, self.collectives, generation=self.generation)
        served.load(record.base_path, with_optimizer=True)
        served.applied = record.base_seq
        log.info("rank %d: session %s rebuilt from its base (seq %d)", self.rank,
                 record.session_id, record.base_seq)
        self.sessions[record.session_id] = served
        return served

    def _run(self, op: OperationRecord, record: SessionRecord, served: ServedSession | None
             ) -> tuple[dict | None, str | None]:
        """Run ``op``; (result, None), or (None, why) for a refusal every rank makes alike. A
        lost peer (CollectiveError, TimeoutError) propagates: the group re-forms."""
        try:
            if op.kind == "create":
                if served is None:
                    served = open_session(self.train, record, self.collectives,
                                          generation=self.generation)
                    self.sessions[record.session_id] = served
                served.applied = op.seq
                return {"model": served.info.model_dump()}, None
            body = BODIES[op.kind].model_validate(op.body)
            result = self._dispatch(op, body, served)
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

    def _dispatch(self, op: OperationRecord, body, served: ServedSession) -> dict:
        root = self.root(op.session_id)
        if op.kind == "forward_backward":
            return ops.forward_backward(served, body)
        if op.kind == "optim_step":
            result = ops.optim_step(served, body)
            if served.progress.step % self.config.base_every == 0:
                self._base(served, ops.save_base(served, root), op.seq)
            return result
        if op.kind == "save_state":
            result = ops.save_state(served, body, root, op.seq)
            if not served.dirty and self.rank == 0:
                self._base(served, Path(result["path"]), op.seq)
            return result
        if op.kind == "save_weights_for_sampler":
            return ops.save_for_sampler(served, body, root)
        if op.kind == "load_state":
            return ops.load_state(served, body)
        if op.kind == "sample":
            return ops.sample(served, body, op.seq)
        return ops.compute_logprobs(served, body)

    def _base(self, served: ServedSession, path: Path, seq: int) -> None:
        if self.rank == 0:
            self.channel.set_base(served.session_id, seq=seq, path=str(path.resolve()))
