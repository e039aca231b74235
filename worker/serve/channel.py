"""The serving group's calls to the coordinator's /service routes, through the membership
facade (its deadlines and retries; a coordinator restart is waited out)."""

from __future__ import annotations

import logging

from communication.collectives import CollectiveError
from worker.main import recovering_phase
from worker.membership.client import CoordinatorError
from worker.membership.facade import Membership
from zerop2p.requests import NextOperation, OperationRecord, ResumePoint

log = logging.getLogger(__name__)

NEXT_WAIT_S = 10.0  # one long-poll for the next operation (then the generation is checked)
RETRY_S = 600.0  # how long a coordinator may be away before a serving worker gives up


class ServiceChannel:
    """Operations in, results and replay bases out, for worker ``membership.worker_id``."""

    def __init__(self, membership: Membership, *, generation: int) -> None:
        self.membership = membership
        self.generation = generation

    def check_generation(self) -> None:
        """Raise CollectiveError when this worker's generation should end, so it rejoins at
        once: the generation ended (a peer died, left or re-registered), a member gave it up
        (a collective failed there while this rank was idle: the coordinator ends it only once
        every live member asks, see ``recovering_phase``), or an alive worker of the site waits
        outside it (a restarted one: re-forming takes it in)."""
        site = self.membership.site
        answer = self.membership.request("GET", "/training/generation", params={"site": site},
                                         retry_for=RETRY_S)
        if answer.get("generation") != self.generation:
            raise CollectiveError(f"{self.membership.worker_id}: generation {self.generation} "
                                  f"ended (the active one is {answer.get('generation')})")
        members = {w["worker_id"] for w in answer.get("workers", [])}
        gave_up = recovering_phase(self.generation)
        try:
            workers = self.membership.request("GET", "/workers", retry_for=RETRY_S)
        except CoordinatorError as err:  # TLS mode: the worker list is the admin's to read
            if err.status != 403:
                raise
            return
        for worker in workers:
            if (worker.get("status") != "alive" or worker.get("site") != site
                    or worker["worker_id"] == self.membership.worker_id):
                continue
            if worker["worker_id"] not in members:
                raise CollectiveError(f"{worker['worker_id']} waits outside generation "
                                      f"{self.generation}; re-forming to take it in")
            if worker.get("phase") == gave_up:
                raise CollectiveError(f"{worker['worker_id']} gave up generation "
                                      f"{self.generation}; rejoining with it")

    def resume(self) -> int:
        answer = self.membership.request("GET", "/service/resume", retry_for=RETRY_S)
        return ResumePoint.model_validate(answer).after

    def next(self, after: int, *, wait: float = NEXT_WAIT_S) -> NextOperation:
        answer = self.membership.request("GET", "/service/next",
                                         params={"after": after, "wait": wait}, wait=wait,
                                         retry_for=RETRY_S)
        return NextOperation.model_validate(answer)

    def finish(self, op: OperationRecord, *, result: dict | None = None,
               error: str | None = None) -> None:
        body = {"worker_id": self.membership.worker_id, "generation": self.generation,
                "result": result, "error": error}
        try:
            self._post(f"/service/ops/{op.id}/result", body)
        except CoordinatorError as err:  # a result too large or refused: say so instead
            if result is None or err.status not in (413, 422):
                raise
            log.error("%s #%d: the coordinator refused its result: %s", op.kind, op.seq, err)
            self.finish(op, error=f"the result was refused by the coordinator: {err.message}")

    def set_base(self, session_id: str, *, seq: int, path: str) -> None:
        body = {"worker_id": self.membership.worker_id, "generation": self.generation,
                "seq": seq, "path": path}
        self._post(f"/service/sessions/{session_id}/base", body)

    def _post(self, path: str, body: dict) -> None:
        """POST for the serving group; a 409 (this generation is no longer active) makes the
        worker rejoin, as a lost peer does."""
        try:
            self.membership.request("POST", path, body=body, retry_for=RETRY_S)
        except CoordinatorError as err:
            if err.status == 409:
                raise CollectiveError(f"{self.membership.worker_id}: {err.message}") from err
            raise
