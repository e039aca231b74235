"""Operations: liveness probe, Prometheus metrics, the dashboard page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse, Response

from coordinator import metrics
from coordinator.deps import BEARER, RegistryDep
from coordinator.models import Health
from coordinator.responses import AUTHED, refusals
from coordinator.service import Refusal

router = APIRouter(tags=["ops"])
DASHBOARD = Path(__file__).resolve().parent.parent / "static" / "index.html"
# the page's script, styles and vendored chart library (uPlot, MIT): open, they hold no data
STATIC = {f.name: f for f in DASHBOARD.parent.iterdir() if f.is_file() and f != DASHBOARD}
PROMETHEUS_TEXT = {200: {"description": "Prometheus text exposition format 0.0.4",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get("/healthz", responses=refusals(413))
async def healthz() -> Health:
    """Open liveness probe."""
    return Health(ok=True)


@router.get("/metrics", dependencies=BEARER, response_class=PlainTextResponse,
            responses={**PROMETHEUS_TEXT, **refusals(*AUTHED, 403, inline=True)})
async def prometheus(registry: RegistryDep) -> Response:
    """Prometheus text exposition."""
    return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    """A static page; its script asks for the token and reads the authenticated routes."""
    return FileResponse(DASHBOARD, media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    """A file of the dashboard (coordinator/static/), by name."""
    if name not in STATIC:
        raise Refusal(404, f"no static file {name[:64]!r}")
    return FileResponse(STATIC[name])
