"""Every answer but success, as the OpenAPI schema documents it: error bodies and, per route,
the refusals it can give (the door's 401 and 413, validation's 422, the rules' 404 and 409).

The schema lists exactly what a route returns, so a client (or a fuzzer) can trust it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """A refusal: ``detail`` names what was wrong."""

    detail: str


class FieldError(BaseModel):
    """One problem, as FastAPI lists them: where (``["body", "port"]``), what, and its kind."""

    loc: list[str | int]
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """422: ``detail`` names each field and its problem in one line (``"port: ..."``);
    ``errors`` is FastAPI's list of the same problems."""

    detail: str
    errors: list[FieldError]


_WHY = {
    400: "the body is not parseable JSON",
    401: "missing or wrong 'Authorization: Bearer <token>'",
    403: "TLS mode: the credential may not do this (coordinator/roles.py: workers act on their "
         "own id only; reading everything needs the admin token)",
    404: "unknown worker: register first",
    409: "the worker is dead or left (register again), or the generation numbers are spent",
    413: "the request body is larger than the coordinator accepts",
}


def refusals(*statuses: int, inline: bool = False,
             why: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that may answer each of ``statuses`` (422: InvalidRequest).

    ``inline`` spells the JSON body out, for a route whose own answers are not JSON (FastAPI
    would document a model under the route's media type); ``why`` replaces the descriptions
    of some statuses, for a route whose refusals mean something else."""
    reasons = {**_WHY, **(why or {})}
    answers: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        if status == 422:
            answers[status] = {"model": InvalidRequest,
                               "description": "a field is invalid (each one is named)"}
        elif inline:
            answers[status] = {"description": reasons[status], "content": {
                "application/json": {"schema": ErrorBody.model_json_schema()}}}
        else:
            answers[status] = {"model": ErrorBody, "description": reasons[status]}
    return answers


AUTHED = (401, 413)  # the door's answers, before any route runs
WITH_BODY = (*AUTHED, 400, 422)
