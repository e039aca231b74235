"""Outer rounds across islands: arrive at a round (long-poll until decided), list decided ones."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from coordinator.deps import BEARER, IslandsDep, PrincipalDep
from coordinator.fields import MAX_STEP
from coordinator.models import DecidedRound, RoundRequest, RoundResponse
from coordinator.responses import AUTHED, WITH_BODY, refusals
from coordinator.roles import acts_for

router = APIRouter(prefix="/islands", tags=["islands"], dependencies=BEARER)

WHY = {404: "unknown worker: register first",
       409: "the worker is not a member of its site's active generation with that number (or "
            "a member lacks an outer port), or the round is neither decided nor the next one"}


@router.post("/rounds/{round}", responses=refusals(*WITH_BODY, 403, 404, 409, why=WHY))
async def outer_round(round: Annotated[int, Path(ge=1, le=MAX_STEP)], body: RoundRequest,
                      islands: IslandsDep, principal: PrincipalDep) -> RoundResponse:
    """Count the poster's site at outer round ``round`` (see ``coordinator.islands``) and hold
    the request up to ``wait`` s (at most 60) until the round is decided; ``decided: false``
    when it is not yet (post again). A decided round's answer never changes."""
    acts_for(principal, body.worker_id)
    return await islands.post(round, body)


@router.get("/rounds", responses=refusals(*AUTHED, 403, 422))
async def decided_rounds(islands: IslandsDep,
                         after: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
                         limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                         ) -> list[DecidedRound]:
    """Decided rounds, oldest first: the newest ``limit``, or the first ``limit`` numbered
    above ``after``."""
    rows = islands.coordinator.store.decided_rounds(after=after, limit=limit)
    return [DecidedRound.model_validate(r) for r in rows]
