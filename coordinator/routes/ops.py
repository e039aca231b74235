"""Operations: liveness probe, Prometheus metrics, the dashboard page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from coordinator import metrics
from coordinator.deps import RegistryDep

router = APIRouter(tags=["ops"])
DASHBOARD = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/healthz")
async def healthz() -> dict:
    """Open liveness probe."""
    return {"ok": True}


@router.get("/metrics")
async def prometheus(registry: RegistryDep) -> Response:
    """Prometheus text exposition."""
    return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    """A static page; its script asks for the token and reads the authenticated routes."""
    return FileResponse(DASHBOARD, media_type="text/html")
