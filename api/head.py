"""HEAD on every GET route: the GET's status and headers, no body (RFC 9110 asks every server for it).

FastAPI routes answer only the methods they declare, so `curl -I`, a load balancer's or an uptime
monitor's HEAD probe and a download manager asking an export's size all got 405. This layer sits just
outside the routes (the caller is identified, counted and logged as HEAD): it hands the request on as
a GET and passes the answer's start, with its `Content-Length`, but no body. Once the start has gone,
the response is ended and the route is told its client has gone, so a stream (a job's events, a file
being sent) stops at once instead of running on for nobody.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_GONE: Message = {"type": "http.disconnect"}


class Head:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = asyncio.Event()
        as_get = {**scope, "method": "GET"}

        async def headers_only(message: Message) -> None:
            if ended.is_set():
                return
            if message["type"] == "http.response.start":
                if "route" in as_get:  # the route the GET matched, for the access line and metrics
                    scope["route"] = as_get["route"]
                await send(message)
            elif message["type"] == "http.response.body":
                ended.set()
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone_once_answered() -> Message:
            """The client's messages, until the answer has ended: then that it has gone (at once, even
            to a route already waiting for its next message)."""
            if ended.is_set():
                return _GONE
            message = asyncio.ensure_future(receive())
            answered = asyncio.ensure_future(ended.wait())
            await asyncio.wait((message, answered), return_when=asyncio.FIRST_COMPLETED)
            if message.done():
                answered.cancel()
                return message.result()
            message.cancel()
            return _GONE

        await self.app(as_get, gone_once_answered, headers_only)
