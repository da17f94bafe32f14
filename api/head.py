"""HEAD on every GET route: the GET's status and headers, no body (RFC 9110 asks every server for it).

FastAPI routes answer only the methods they declare, so `curl -I`, a load balancer's or an uptime
monitor's HEAD probe and a download manager asking an export's size all got 405. This layer sits just
outside the routes (the caller is identified, counted and logged as HEAD): it hands the request on as
a GET and passes the answer's start, with its `Content-Length`, but no body. Once the start has gone,
the request is ended, and the route is told its client has gone, so a stream (a job's events, a
download) stops instead of running on for nobody.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Head:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False
        as_get = {**scope, "method": "GET"}

        async def headers_only(message: Message) -> None:
            nonlocal ended
            if ended:
                return
            if message["type"] == "http.response.start":
                if "route" in as_get:  # the route the GET matched, for the access line and metrics
                    scope["route"] = as_get["route"]
                await send(message)
            elif message["type"] == "http.response.body":
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone_once_answered() -> Message:
            if ended:
                return {"type": "http.disconnect"}
            return await receive()

        await self.app(as_get, gone_once_answered, headers_only)
