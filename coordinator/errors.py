"""Error answers: every refusal is a JSON ``{"detail": "..."}`` naming what was wrong."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from coordinator.service import Refusal

SOURCES = ("body", "query", "path", "header")


def describe(errors: list[dict]) -> str:
    """``[{'loc': ('body', 'port'), 'msg': ...}]`` -> ``"port: ..."`` (the field first)."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        if err.get("type") == "json_invalid":
            parts.append(f"body: malformed JSON ({err.get('ctx', {}).get('error', 'invalid')})")
            continue
        if len(loc) > 1 and loc[0] in SOURCES:
            loc = loc[1:]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    """422 with a readable detail for validation errors; Refusal -> its status."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe(list(exc.errors()))}, status_code=422)

    @app.exception_handler(Refusal)
    async def _refused(_: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)
