"""Liveness and readiness for load balancers and Kubernetes probes (open: no API key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.http.routing import Registry

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    """Live: the ingress answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Some model cannot answer yet"}})
async def readyz(registry: Registry) -> JSONResponse:
    """Ready only when every model's replica answers."""
    failing = await registry.not_ready()
    if failing:
        return JSONResponse({"status": "not ready", "models": failing}, status_code=503)
    return JSONResponse({"status": "ready", "models": {n: "ready" for n in registry.names}})
