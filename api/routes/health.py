"""Liveness, readiness and the status overview."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.broker import broker_status, queue_depths, workers_online
from api.deps import Reader, SessionDep
from api.envelope import Envelope, iso, ok
from pipelines import __version__
from pipelines.jobs import status

STARTED = time.monotonic()
root = APIRouter(tags=["health"])
router = APIRouter(tags=["health"])


def _health() -> dict:
    return {"status": "healthy", "version": __version__, "uptime": round(time.monotonic() - STARTED, 1)}


@root.get("/health")
async def health() -> dict:  # on the event loop: liveness never queues behind data routes for a thread
    return _health()


@root.get("/ready")
def ready() -> JSONResponse:
    checks = {
        "database": "ok" if status.database_ok() else "unreachable",
        "broker": "ok" if broker_status() else "unreachable",
    }
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if healthy else "not_ready", "checks": checks}, 200 if healthy else 503)


@router.get("/health", response_model=Envelope[dict[str, Any]])
async def api_health(request: Request) -> dict:
    return ok(request, _health())


@router.get("/status", response_model=Envelope[dict[str, Any]])
def overview(request: Request, session: SessionDep, caller: Reader) -> dict:
    cycles = status.ingestion_cycles(session)
    cycles["last_cycle"] = iso(cycles["last_cycle"])
    connected = broker_status()
    return ok(
        request,
        {
            "ingestion": cycles,
            "database": status.database_stats(session),
            "broker": {"connected": connected, "queues": queue_depths() if connected else {}},
            "workers": {"online": workers_online() if connected else 0},
            "storage": status.storage(session, admin=caller.grants("admin")),
        },
    )
