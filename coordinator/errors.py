"""Error answers: every refusal is a JSON ``{"detail": "..."}`` naming what was wrong; a 422 also
carries FastAPI's list of errors (``coordinator.responses.InvalidRequest``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import compile_path

from coordinator.fields import PATTERN_MEANING
from coordinator.service import Refusal

SOURCES = ("body", "query", "path", "header")


def _message(err: dict) -> str:
    """The error's message; a pattern mismatch says what the pattern means instead."""
    if err.get("type") == "string_pattern_mismatch":
        meaning = PATTERN_MEANING.get(err.get("ctx", {}).get("pattern"))
        if meaning:
            return f"String {meaning}"
    return str(err.get("msg", "invalid"))


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
        parts.append(f"{'.'.join(loc) or 'body'}: {_message(err)}")
    return "; ".join(parts)


def listed(errors: list[dict]) -> list[dict]:
    """FastAPI's error list, without the input (a hostile value is not echoed back) or ctx."""
    return [{"loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
             "msg": _message(err), "type": str(err.get("type", "invalid"))}
            for err in errors]


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI schema lists for ``path`` (GET implies HEAD); a path the schema
    names literally (``/workers/register``) is not also read as a template's instance."""
    paths = app.openapi().get("paths", {})
    templates = [path] if path in paths else [t for t in paths if compile_path(t)[0].match(path)]
    methods = {m.upper() for t in templates for m in paths[t]}
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))


def invalid_field(loc: tuple[str, ...], message: str) -> RequestValidationError:
    """A 422 for one field that its schema cannot check (a CSR's signature), answered like
    pydantic's own."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def install(app: FastAPI) -> None:
    """422 with a readable detail and the error list for validation errors; Refusal -> its
    status."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        return JSONResponse({"detail": describe(errors), "errors": listed(errors)},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        methods = allowed_methods(app, request.url.path) if exc.status_code == 405 else None
        if methods:  # Allow: every method of the path, not only one route's
            headers["Allow"] = ", ".join(methods)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Refusal)
    async def _refused(_: Request, exc: Refusal) -> JSONResponse:
        body = {"detail": exc.message}
        if exc.status == 422:  # a rule on the body's values: answered like pydantic's 422
            body["errors"] = [{"loc": ["body"], "msg": exc.message, "type": "value_error"}]
        return JSONResponse(body, status_code=exc.status)
