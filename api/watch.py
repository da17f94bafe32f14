"""Job event streams: one reader per API process, however many people are watching.

`GET /api/v1/jobs/{id}/events` streams a job's state, progress and counts as server-sent events until
the job ends. Each open stream only waits on its queue: the process's one `Watcher` reads every
watched job in a single statement every `INTERVAL` seconds (over the API's async pool, one connection
for a moment) and hands each stream the rows that changed. Several hundred streams cost one
statement per interval, not a database connection each. A key holds at most
`INGOT_MAX_EVENT_STREAMS_PER_KEY` streams open at once, and a key revoked or expired while it watches
has its streams ended within KEY_CHECK seconds; a bearer token's streams end when it expires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from pipelines.auth.principal import Principal
from pipelines.auth.quotas import QuotaExceeded
from pipelines.core import adb
from pipelines.core.clock import utc_z
from pipelines.core.models import FINAL_STATES
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)
INTERVAL = 0.25  # seconds between reads of the watched jobs
KEEPALIVE = 15.0  # seconds of silence before a comment line keeps proxies from closing the stream
KEY_CHECK = 2.0  # seconds between checks that the keys watching are still valid
_WATCHED = ("SELECT id, kind, state, progress, records_processed, records_failed, error, started_at, finished_at "
            "FROM jobs WHERE id = ANY(%s)")
FIELDS = ("id", "kind", "state", "progress", "records_processed", "records_failed", "error", "started_at",
          "finished_at")
_FINAL = {str(s) for s in FINAL_STATES}
# The keys among those watching that are still valid: a stream whose key is revoked or expires ends.
_LIVE_KEYS = ("SELECT id FROM api_keys WHERE id = ANY(%s) AND revoked_at IS NULL "
              "AND (expires_at IS NULL OR expires_at > now())")
_CUT: dict[str, Any] = {}  # put on a stream's queue (compared by identity): its key is no longer valid


class Watcher:
    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue]] = {}
        self._keys: dict[asyncio.Queue, str] = {}  # the streams watched with an API key, and its id
        self._task: asyncio.Task | None = None

    async def follow(self, job: dict[str, Any], key_id: str | None = None, until: float | None = None
                     ) -> AsyncIterator[dict[str, Any] | None]:
        """JOB's row now, then each time it changes, until it ends (its final row is the last); None
        after KEEPALIVE seconds without a change. Watched with the API key KEY_ID, it also ends within
        KEY_CHECK seconds of that key being revoked or expiring; with a bearer token, at UNTIL (epoch
        seconds), when the token expires."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams.setdefault(job["id"], set()).add(queue)
        if key_id is not None:
            self._keys[queue] = key_id
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_forever(), name="job-watcher")
        try:
            last = _shown(job)
            yield last
            while last["state"] not in _FINAL:
                left = KEEPALIVE if until is None else min(KEEPALIVE, until - time.time())
                if left <= 0:
                    return  # the token it was opened with has expired
                try:
                    row = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    if until is None or time.time() < until:
                        yield None
                    continue
                if row is None or row is _CUT:  # the job's row is gone (retention), or the key is no longer valid
                    return
                if row != last:
                    last = row
                    yield row
        finally:
            self._keys.pop(queue, None)
            watching = self._streams.get(job["id"], set())
            watching.discard(queue)
            if not watching:
                self._streams.pop(job["id"], None)

    async def _read_forever(self) -> None:
        keys_checked = time.monotonic()
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
            if self._keys and time.monotonic() - keys_checked >= KEY_CHECK:
                keys_checked = time.monotonic()
                await self._cut_revoked()
            await asyncio.sleep(INTERVAL)

    async def _cut_revoked(self) -> None:
        try:
            live = {r["id"] for r in await adb.fetch(_LIVE_KEYS, (sorted(set(self._keys.values())),))}
        except Exception as exc:  # the database away: the streams go on, checked once it is back
            log.warning("job watcher could not check the watching keys (%s); retrying", exc)
            return
        for queue, key_id in list(self._keys.items()):
            if key_id not in live:
                queue.put_nowait(_CUT)


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {name: (utc_z(value) if isinstance(value, datetime) else value)
            for name, value in row.items() if name in FIELDS}


WATCHER = Watcher()


_open: Counter[str] = Counter()  # event streams open in this process, by the principal watching


def event_stream(job: dict[str, Any], watcher: Principal, until: float | None = None) -> AsyncIterator[bytes]:
    """JOB as server-sent events for WATCHER (until UNTIL, when its bearer token expires), counted against its
    `INGOT_MAX_EVENT_STREAMS_PER_KEY` open at once in this process: past it, QuotaExceeded at once.

    A stream waits for its job for as long as the job takes, so without a cap one caller could open
    streams until the process had no file descriptor left for anyone else. The count is given back when
    the stream ends, or when it is dropped without having started (a client gone before its first byte)."""
    watcher_id = watcher.id
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

    stream = _events(job, watcher_id if watcher.kind == "key" else None, until, release)
    weakref.finalize(stream, release)
    return stream


async def _events(job: dict[str, Any], key_id: str | None, until: float | None, release: Callable[[], None]
                  ) -> AsyncIterator[bytes]:
    """`job` for each change (the first at once), `end` once it has ended; a comment line after
    KEEPALIVE seconds of silence. The stream then closes."""
    try:
        yield b"retry: 2000\n\n"
        sequence = 0
        async for row in WATCHER.follow(job, key_id, until):
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
