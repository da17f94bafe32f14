"""Job event streams: one reader per API process, however many people are watching.

`GET /api/v1/jobs/{id}/events` streams a job's state, progress and counts as server-sent events until
the job ends. Each open stream only waits on its queue: the process's one `Watcher` reads every
watched job in a single statement every `INTERVAL` seconds (over the API's async pool, one connection
for a moment) and hands each stream the rows that changed. Several hundred streams cost one
statement per interval, not a database connection each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from pipelines.auth.quotas import QuotaExceeded
from pipelines.core import adb
from pipelines.core.clock import utc_z
from pipelines.core.models import FINAL_STATES
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)
INTERVAL = 0.25  # seconds between reads of the watched jobs
KEEPALIVE = 15.0  # seconds of silence before a comment line keeps proxies from closing the stream
_WATCHED = ("SELECT id, kind, state, progress, records_processed, records_failed, error, started_at, finished_at "
            "FROM jobs WHERE id = ANY(%s)")
FIELDS = ("id", "kind", "state", "progress", "records_processed", "records_failed", "error", "started_at",
          "finished_at")
_FINAL = {str(s) for s in FINAL_STATES}


class Watcher:
    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue]] = {}
        self._task: asyncio.Task | None = None

    async def follow(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | None]:
        """JOB's row now, then each time it changes, until it ends (its final row is the last); None
        after KEEPALIVE seconds without a change."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams.setdefault(job["id"], set()).add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_forever(), name="job-watcher")
        try:
            last = _shown(job)
            yield last
            while last["state"] not in _FINAL:
                try:
                    row = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    yield None
                    continue
                if row is None:  # the job's row is gone (retention): nothing more to tell
                    return
                if row != last:
                    last = row
                    yield row
        finally:
            watching = self._streams.get(job["id"], set())
            watching.discard(queue)
            if not watching:
                self._streams.pop(job["id"], None)

    async def _read_forever(self) -> None:
        while self._streams:
            ids = list(self._streams)
            try:
                rows = {r["id"]: _shown(r) for r in await adb.fetch(_WATCHED, (ids,))}
            except Exception as exc:  # the database away: the streams wait, and hear once it is back
                log.warning("job watcher could not read the jobs (%s); retrying", exc)
                rows = None
            if rows is not None:
                for job_id in ids:
                    for queue in self._streams.get(job_id, ()):
                        queue.put_nowait(rows.get(job_id))
            await asyncio.sleep(INTERVAL)


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {name: (utc_z(value) if isinstance(value, datetime) else value)
            for name, value in row.items() if name in FIELDS}


WATCHER = Watcher()


_open: Counter[str] = Counter()  # event streams open in this process, by the principal watching


def event_stream(job: dict[str, Any], watcher_id: str) -> AsyncIterator[bytes]:
    """JOB as server-sent events for WATCHER_ID (a principal), counted against its
    `INGOT_MAX_EVENT_STREAMS_PER_KEY` open at once in this process: past it, QuotaExceeded at once.

    A stream waits for its job for as long as the job takes, so without a cap one caller could open
    streams until the process had no file descriptor left for anyone else. The count is given back when
    the stream ends, or when it is dropped without having started (a client gone before its first byte)."""
    allowed = get_settings().max_event_streams_per_key
    if _open[watcher_id] >= allowed:
        raise QuotaExceeded("job event streams open", _open[watcher_id], allowed)
    _open[watcher_id] += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            _open[watcher_id] -= 1
            if not _open[watcher_id]:
                del _open[watcher_id]

    stream = _events(job, release)
    weakref.finalize(stream, release)
    return stream


async def _events(job: dict[str, Any], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """`job` for each change (the first at once), `end` once it has ended; a comment line after
    KEEPALIVE seconds of silence. The stream then closes."""
    try:
        yield b"retry: 2000\n\n"
        sequence = 0
        async for row in WATCHER.follow(job):
            if row is None:
                yield b": still watching\n\n"
                continue
            sequence += 1
            data = json.dumps(row, separators=(",", ":"))
            yield f"id: {sequence}\nevent: job\ndata: {data}\n\n".encode()
            if row["state"] in _FINAL:
                yield f"event: end\ndata: {data}\n\n".encode()
    finally:
        release()
