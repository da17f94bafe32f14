"""The request body limit, counted on the bytes that arrive, not on what the headers claim.

An ASGI wrapper outside everything else: it reads the body (at most the limit, plus one chunk) before
any route, dependency or authentication sees the request, and answers 413 in the envelope as soon as
the count passes the limit, whatever `Content-Length` or `Transfer-Encoding` said. A body within the
limit is handed on unchanged.

It also refuses, with 422, a NUL character anywhere in the path, the query string or a JSON body
(raw, `%00` or `\u0000`): PostgreSQL cannot store one in text, and no field of the API has a use for
it, so such a request is answered as invalid here instead of failing later in a query.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.access import REQUEST_ID
from pipelines.core.clock import utc_z


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or _has_nul(scope.get("query_string", b"").replace(b"%00", b"\x00")):
            await refuse(scope, send, 422, "VALIDATION_ERROR", "the path or query string holds a NUL character", [])
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
        body = b"".join(chunks)
        if _has_nul(body):
            await refuse(scope, send, 422, "VALIDATION_ERROR", "the request body holds a NUL character", [])
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await refuse(scope, send, 413, "PAYLOAD_TOO_LARGE", f"request body larger than {self.limit:,} bytes",
                     [(b"connection", b"close")])


async def refuse(scope: Scope, send: Send, status: int, code: str, message: str,
                 headers: list[tuple[bytes, bytes]]) -> None:
    """Answer STATUS in the envelope from outside the app (no route, dependency or handler ran)."""
    supplied = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
    request_id = (scope.get("state") or {}).get("request_id")  # given already, inside api.envelope's layer
    if request_id is None:
        request_id = supplied if REQUEST_ID.match(supplied) else f"req_{secrets.token_hex(8)}"
    body = json.dumps({
        "success": False,
        "error": {"code": code, "message": message, "details": {}},
        "timestamp": utc_z(datetime.now(UTC)),
        "request_id": request_id,
    }).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()), *headers]})
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


def _has_nul(data: bytes) -> bool:
    """A NUL byte, or JSON's escape for one."""
    return b"\x00" in data or b"\\u0000" in data.lower()
