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

The reads that may make the database work hardest (HEAVY: the data query, curves, scenario outputs)
also wait for one of `INGOT_API_HEAVY_CONCURRENCY` places of their own (half the cores by default)
before they take a slot: a few readers sending deep, freshly filtered pages queue behind each other,
not in front of everyone, and leave the database cores for the rest (bench/readers.py).
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
HEAVY = re.compile(r"^(/api)?/v1/(data/query|curves|curves/diff|scenarios/[^/]+/outputs)$")


class Admission:
    def __init__(self, app: ASGIApp, limit: int, queue_seconds: float, heavy_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.heavy_limit = min(limit, heavy_limit or limit)
        self.queue_seconds = queue_seconds
        # Made on the server's event loop, at the first request.
        self._slots: asyncio.Semaphore | None = None
        self._heavy: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in EXEMPT or (
                scope["method"] == "GET" and OWN_LANE.match(route_path(scope))):
            await self.app(scope, receive, send)
            return
        if self._slots is None or self._heavy is None:
            self._slots, self._heavy = asyncio.Semaphore(self.limit), asyncio.Semaphore(self.heavy_limit)
        lanes = [self._heavy, self._slots] if HEAVY.match(route_path(scope)) else [self._slots]
        taken: list[asyncio.Semaphore] = []
        try:
            if any(lane.locked() for lane in lanes):
                async with asyncio.timeout(self.queue_seconds):  # a timer, not a task per waiting request
                    for lane in lanes:
                        await lane.acquire()
                        taken.append(lane)
            else:  # free places are taken at once, without a timer
                for lane in lanes:
                    await lane.acquire()
                    taken.append(lane)
        except TimeoutError:
            for lane in taken:
                lane.release()
            await refuse(scope, send, 503, "SERVICE_UNAVAILABLE",
                         f"the API is at capacity ({self.limit} requests at once); retry shortly",
                         [(b"retry-after", b"1")])
            return
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                for lane in taken:
                    lane.release()

        async def send_then_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()  # the answer is decided: streaming a download out holds no slot
            await send(message)

        try:
            await self.app(scope, receive, send_then_release)
        finally:
            release()
