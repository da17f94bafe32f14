"""The gate of /api/v1: every request to it is identified and counted against the default rate limit
here, before it is routed, so none can pass uncounted (a path or method with no route included).

The caller is left in `request.state.identity` for the routes' scope checks (`api.deps`). Done as
a chain of FastAPI dependencies, as it once was, the same work cost a polled route 6% more
instructions, spent in FastAPI's dependency machinery. Past the limit, the request is answered 429
here.
"""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api import limits
from api.envelope import ApiError, error_response
from api.identity import Identity, identify

PREFIX = "/api/v1"
# Seed 000's own paths for the curves and scenarios routes (`/v1/curves`, ...): the same routes,
# gated the same way (README, Compatibility).
COMPAT_PREFIX = "/v1"


class Gate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not gated(scope):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            request.state.identity = await _identity(request)
        except ApiError as exc:  # past the rate limit
            await error_response(request, exc.status, exc.message, exc.details, exc.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def gated(scope: Scope) -> bool:
    """Whether SCOPE is a request to /api/v1 or to seed 000's /v1 (behind a proxy's root path too)."""
    path = route_path(scope) if scope["type"] == "http" else ""
    return any(path.startswith(prefix) and path[len(prefix):len(prefix) + 1] in ("", "/")
               for prefix in (PREFIX, COMPAT_PREFIX))


def route_path(scope: Scope) -> str:
    """The path the routes match: without the root path a proxy serves the API under, if any."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _identity(request: Request) -> Identity:
    try:
        return await identify(request)
    except (psycopg.OperationalError, OperationalError):
        # The database is away: routes that need a caller answer 503, the rest go on.
        await limits.count_default(request, None)
        return Identity(None, ApiError(503, "the database is unavailable; try again shortly",
                                        headers={"Retry-After": "5"}))
