"""Every request's bookkeeping, in one ASGI layer: its id, its access line, its metrics, and the rate
limit's figures on whatever answer it gets (errors and downloads included).

A plain ASGI wrapper rather than `@app.middleware("http")`: that kind of middleware runs the app in a
task of its own and streams the answer through a memory channel, which cost more per request than the
rest of this file does.
"""

from __future__ import annotations

import logging
import re
import time

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.envelope import new_request_id
from api.gate import gated
from api.limits import address_headers
from pipelines.core.logs import ACCESS

access = logging.getLogger(ACCESS)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class Access:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Headers(scope=scope).get("x-request-id", "")
        rid = supplied if REQUEST_ID.match(supplied) else new_request_id()
        state = scope.setdefault("state", {})  # what `request.state` reads and writes
        state["request_id"] = rid
        status = 500
        began = time.perf_counter()
        recorded = False

        def record() -> None:
            """Count the request and write its access line, once: as its answer's last bytes go out (so
            whoever reads the answer can already find the line), or when the app ends without one."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            seconds = time.perf_counter() - began
            method, route, principal = scope["method"], metrics.route_template(scope), state.get("api_key_id")
            metrics.observe(method, route, status, seconds, principal)
            # One access line per request, JSON like every other line (never a query string: it may hold a
            # cursor). Made and handled as Logger.info would, without its look-up of the caller's frame.
            if access.isEnabledFor(logging.INFO):
                fields = {"method": method, "route": route, "status": status,
                          "duration_ms": round(seconds * 1000, 1), "principal": principal, "request_id": rid}
                access.handle(access.makeRecord(ACCESS, logging.INFO, __file__, 0, "%s %s %s",
                                                (method, route, status), None, extra=fields))

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                shown = state.get("rate_limit_headers")
                if shown is None and gated(scope):
                    # Turned away before the gate counted it (the API at capacity): counted by address.
                    shown = await address_headers(Request(scope))
                headers.update(shown or {})
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            record()
            structlog.contextvars.unbind_contextvars("request_id")
