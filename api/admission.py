"""Admission: at most N requests inside the app at once, the rest wait their turn or are told to come back.

Every request that enters may hold a database connection from the moment its key is checked until its
answer is shaped, and some hold a second one for a moment (a status query, the runtime settings
refresh). With more requests inside than the pool has connections, they wait on each other: under a
few dozen connections the process once stopped answering altogether. So the app lets in at most
`INGOT_API_CONCURRENCY` requests at once (never more than the pool can serve twice over); the others
wait on the event loop, which costs nothing, for up to `INGOT_API_QUEUE_SECONDS`, and are then
answered 503 with `Retry-After`. A request gives its place back as soon as its answer starts (a
download streaming out holds none). Liveness (`/health`) is never held: it needs neither a thread
nor the database; nor are the polled routes (OWN_LANE), which need no thread. Fewer requests
inside at once also means less contention for the interpreter: on
two cores, 4 at once served more requests a second than 10 (bench/api.py).
"""

from __future__ import annotations

import asyncio
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodylimit import refuse
from api.gate import route_path

EXEMPT = frozenset({"/health"})
# The routes clients poll (a job, the ingestion status) run on the event loop over the API's own
# asynchronous connections (pipelines.core.adb, bounded by their pool), never in a thread or a
# SQLAlchemy session: they have a lane of their own, so a poller never waits behind heavy reads.
OWN_LANE = re.compile(r"^/api/v1/(jobs/[^/]+|ingestion/status)$")


class Admission:
    def __init__(self, app: ASGIApp, limit: int, queue_seconds: float) -> None:
        self.app = app
        self.limit = limit
        self.queue_seconds = queue_seconds
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop, at the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in EXEMPT or (
                scope["method"] == "GET" and OWN_LANE.match(route_path(scope))):
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        try:
            if self._slots.locked():  # a free slot is taken at once, without a timer
                async with asyncio.timeout(self.queue_seconds):  # a timer, not a task per waiting request
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            await refuse(scope, send, 503, "SERVICE_UNAVAILABLE",
                         f"the API is at capacity ({self.limit} requests at once); retry shortly",
                         [(b"retry-after", b"1")])
            return
        slots, held = self._slots, True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        async def send_then_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()  # the answer is decided: streaming a download out holds no slot
            await send(message)

        try:
            await self.app(scope, receive, send_then_release)
        finally:
            release()
