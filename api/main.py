"""create_app(): the control plane, its routes and its envelope."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, FastAPI
from fastapi_offline import FastAPIOffline

from api import envelope, metrics
from api.bodylimit import BodyLimit
from api.limits import default_limit
from api.routes import (
    admin,
    auth,
    curves,
    data,
    exports,
    health,
    ingestion,
    jobs,
    keys,
    scenarios,
    sources,
    webhooks,
)
from pipelines import __version__
from pipelines.core.logs import configure
from pipelines.core.settings import get_settings

log = logging.getLogger("ingot.api")


def create_app() -> FastAPI:
    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    if settings.auth_disabled:
        log.warning("AUTHENTICATION IS DISABLED (INGOT_AUTH_DISABLED): every caller is an admin")
    # The documentation's scripts and styles are served from the installed package, not a CDN: /docs
    # and /redoc work on a machine with no internet.
    app = FastAPIOffline(
        title="Ingot control plane",
        version=__version__,
        description="Start, stop and watch ingestion, export and scenario jobs; read curves.",
        responses=envelope.ERROR_RESPONSES,
    )
    metrics.install(app)
    envelope.install(app)
    app.include_router(health.root)
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(default_limit)])
    api.include_router(health.router)
    for module in (auth, keys, sources, ingestion, jobs, data, exports, curves, scenarios, webhooks, admin):
        api.include_router(module.router)
    app.include_router(api)
    # Outermost: the body is counted before anything else reads the request.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
