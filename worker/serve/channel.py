"""The serving group's calls to the coordinator's /service routes, through the membership
facade (its deadlines and retries; a coordinator restart is waited out)."""

from __future__ import annotations

import logging

from communication.collectives import CollectiveError
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
        """Raise CollectiveError when this worker's generation has ended (a peer died or was
        replaced while the group was idle), so the worker rejoins at once."""
        answer = self.membership.request("GET", "/training/generation",
                                         params={"site": self.membership.site},
                                         retry_for=RETRY_S)
        if answer.get("generation") != self.generation:
            raise CollectiveError(f"{self.membership.worker_id}: generation {self.generation} "
                                  f"ended (the active one is {answer.get('generation')})")

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
        self.membership.request("POST", f"/service/ops/{op.id}/result", body=body,
                                retry_for=RETRY_S)

    def set_base(self, session_id: str, *, seq: int, path: str) -> None:
        body = {"worker_id": self.membership.worker_id, "seq": seq, "path": path}
        self.membership.request("POST", f"/service/sessions/{session_id}/base", body=body,
                                retry_for=RETRY_S)
