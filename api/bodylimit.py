"""The request body limit, counted on the bytes that arrive, not on what the headers claim.

An ASGI wrapper outside everything else: it reads the body (at most the limit, plus one chunk) before
any route, dependency or authentication sees the request, and answers 413 in the envelope as soon as
the count passes the limit, whatever `Content-Length` or `Transfer-Encoding` said. A body within the
limit is handed on unchanged.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.core.clock import utc_z

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        claimed = headers.get(b"content-length", b"")
        if claimed.isdigit() and int(claimed) > self.limit:
            await self._refuse(scope, send)  # no need to read what is already known to be too large
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = supplied if _REQUEST_ID.match(supplied) else f"req_{secrets.token_hex(8)}"
        body = json.dumps({
            "success": False,
            "error": {"code": "PAYLOAD_TOO_LARGE", "message": f"request body larger than {self.limit:,} bytes",
                      "details": {}},
            "timestamp": utc_z(datetime.now(UTC)),
            "request_id": request_id,
        }).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives BODY once, then waits for the client's disconnect as the real one does."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
