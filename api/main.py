"""create_app(): the control plane, its routes and its envelope."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api import envelope, limits, metrics
from api.access import Access
from api.admission import Admission
from api.bodylimit import BodyLimit
from api.deadline import Deadline
from api.gate import COMPAT_PREFIX, PREFIX, Gate
from api.head import Head
from api.protocol import HeadersDeadline
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
    users,
    webhooks,
)
from pipelines import __version__
from pipelines.core import adb, memory, runtime
from pipelines.core.logs import configure
from pipelines.core.settings import get_settings

log = logging.getLogger("ingot.api")
COMPAT_TAG = "seed 000 (Aurum) paths"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    await run_in_threadpool(runtime.refresh)  # runtime settings read before the first request needs them
    memory.freeze_startup()  # full collections stop walking the imports and the app: no 150 ms pauses
    yield
    await adb.close()
    limits.close()


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
        lifespan=_lifespan,
    )
    app.add_middleware(Head)  # innermost: the layers outside see (log, count) the HEAD it is
    app.add_middleware(Gate)  # inside admission: identifying a caller may need the database
    # Inside the access layer: a request turned away at capacity is still logged and counted.
    app.add_middleware(Admission, limit=min(settings.api_concurrency, settings.db_pool_size),
                       queue_seconds=settings.api_queue_seconds,
                       heavy_limit=settings.api_heavy_concurrency or max(1, (os.cpu_count() or 2) // 2))
    app.add_middleware(Deadline, seconds=settings.api_request_timeout_seconds)  # the wait for a slot counts
    app.add_middleware(Access)
    metrics.install(app)
    envelope.install(app)
    app.include_router(health.root)
    # Each router is included in the app itself (a request is matched again at each level of routers it
    # goes through), and they are matched in order: those polled most (a job, the ingestion status) first.
    for router in (jobs.router, ingestion.router, health.router, *(module.router for module in (
            auth, keys, users, sources, data, exports, curves, scenarios, webhooks, admin))):
        app.include_router(router, prefix=PREFIX)
    # Seed 000's surface (README, Compatibility): the curves and scenarios routes again at /v1, the
    # same route table and handlers, listed under a tag of their own.
    for router in (curves.router, scenarios.router):
        app.include_router(router, prefix=COMPAT_PREFIX, tags=[COMPAT_TAG])
    _document_no_nul(app)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # none by default: browsers on other origins may not call the API
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                                           "X-RateLimit-Reset", "Retry-After", "X-Pagination-Total"])
    # Outermost: the body is counted before anything else reads the request.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.trusted_proxy_list:
        # Who the client is (rate limits by address, the login limit) is the connection's address,
        # unless the connection comes from a listed proxy. Decided here, not by the server's options
        # (uvicorn's own trusts loopback by default), so every way of serving the app agrees.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxy_list)
    return app


# How the server must run the app: forwarded headers are the app's business (see create_app), and a
# connection that does not send a request's headers by the request deadline is closed (api.protocol).
SERVER_OPTIONS: dict[str, Any] = {"proxy_headers": False, "server_header": False, "http": HeadersDeadline}


def _document_no_nul(app: FastAPI) -> None:
    """Say in the OpenAPI document what api.bodylimit enforces: no text field or parameter may hold a
    NUL character (PostgreSQL cannot store one). Clients and fuzzers read it as a pattern. (And list
    seed 000's paths under their own tag only.)"""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()
            for route, path in document.get("paths", {}).items():
                for operation in path.values():
                    for parameter in operation.get("parameters", []):
                        _no_nul(parameter.get("schema", {}))
                    if route.startswith(COMPAT_PREFIX + "/"):  # seed 000's paths: under their tag alone
                        operation["tags"] = [COMPAT_TAG]
            for schema in document.get("components", {}).get("schemas", {}).values():
                _no_nul(schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _no_nul(schema: dict) -> None:
    if schema.get("type") == "string" and not {"pattern", "format", "enum", "const"} & schema.keys():
        schema["pattern"] = "^[^\\u0000]*$"
    for key in ("properties", "$defs"):
        for child in schema.get(key, {}).values():
            _no_nul(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _no_nul(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        for child in schema.get(key, []):
            _no_nul(child)
