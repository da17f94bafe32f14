"""The request's deadline: every request is answered within `INGOT_API_REQUEST_TIMEOUT_SECONDS`,
whatever the database does.

A database that stops answering (a stalled disk, a frozen host, a lock storm) enforces no statement
timeout of its own, and a connection to it waits as long as it is stopped. So the clock is kept
here: a request with no answer started by its deadline is answered 503 `SERVICE_UNAVAILABLE` with
`Retry-After`, and its work is cancelled. Work on the event loop stops at once (an asynchronous
connection caught mid-statement is closed, not pooled); work in a thread cannot be stopped, so its
session is abandoned (`pipelines.core.db.abandon`): closed as soon as its statement returns, refusing
any further one, so that nothing it meant to commit is committed after its caller was told no.
Once an answer has started (a download streaming out), the deadline no longer applies.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admission import EXEMPT
from api.bodylimit import refuse
from api.gate import route_path


class Deadline:
    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in EXEMPT:
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.seconds) as timer:
                async def send_and_stop_the_clock(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        timer.reschedule(None)
                    await send(message)

                await self.app(scope, receive, send_and_stop_the_clock)
        except TimeoutError:
            if not timer.expired():
                raise  # a timeout of the app's own, not this deadline
            await refuse(scope, send, 503, "SERVICE_UNAVAILABLE",
                         f"no answer within {self.seconds:g} s: the database is slow or not answering; "
                         "retry shortly", [(b"retry-after", b"5")])
