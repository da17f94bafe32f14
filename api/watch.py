"""Job event streams: one reader per API process, however many people are watching.

`GET /api/v1/jobs/{id}/events` streams a job's state, progress and counts as server-sent events until
the job ends. Each open stream only waits on its queue: the process's one `Watcher` reads every
watched job in a single statement every `INTERVAL` seconds (over the API's async pool, one connection
for a moment) and hands each stream the rows that changed. Several hundred streams cost one
statement per interval, not a database connection each. A key holds at most
`INGOT_MAX_EVENT_STREAMS_PER_KEY` streams open at once, and a key revoked or expired while it watches
has its streams ended within CREDENTIAL_CHECK seconds, as has a token logged out or a user disabled; a
bearer token's streams end when it expires.
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
CREDENTIAL_CHECK = 2.0  # seconds between checks that the credentials watching are still valid
_WATCHED = ("SELECT id, kind, state, progress, records_processed, records_failed, error, started_at, finished_at "
            "FROM jobs WHERE id = ANY(%s)")
FIELDS = ("id", "kind", "state", "progress", "records_processed", "records_failed", "error", "started_at",
          "finished_at")
_FINAL = {str(s) for s in FINAL_STATES}
# Of the credentials watching (tags: `key:ID`, `token:JTI`, `user:ID`), those no longer valid: a key
# revoked or expired, a token logged out, a user disabled. A stream opened with one of them ends.
_DEAD = """
SELECT 'key:' || k AS tag FROM unnest(%(keys)s::text[]) AS k
 WHERE NOT EXISTS (SELECT 1 FROM api_keys WHERE id = k AND revoked_at IS NULL
                                               AND (expires_at IS NULL OR expires_at > now()))
UNION ALL SELECT 'token:' || jti FROM revoked_tokens WHERE jti = ANY(%(tokens)s)
UNION ALL SELECT 'user:' || id FROM users WHERE id = ANY(%(users)s) AND disabled_at IS NOT NULL
"""
_CUT: dict[str, Any] = {}  # put on a stream's queue (compared by identity): its credential is no longer valid


class Watcher:
    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue]] = {}
        self._credentials: dict[asyncio.Queue, tuple[str, ...]] = {}  # a stream's credential, as tags
        self._task: asyncio.Task | None = None

    async def follow(self, job: dict[str, Any], credential: tuple[str, ...] = (), until: float | None = None
                     ) -> AsyncIterator[dict[str, Any] | None]:
        """JOB's row now, then each time it changes, until it ends (its final row is the last); None
        after KEEPALIVE seconds without a change. It also ends within CREDENTIAL_CHECK seconds of its
        CREDENTIAL (tags, as `_DEAD` reads them) being revoked, and at UNTIL (epoch seconds), when the
        token it was opened with expires."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams.setdefault(job["id"], set()).add(queue)
        if credential:
            self._credentials[queue] = credential
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
            self._credentials.pop(queue, None)
            watching = self._streams.get(job["id"], set())
            watching.discard(queue)
            if not watching:
                self._streams.pop(job["id"], None)

    async def _read_forever(self) -> None:
        checked = time.monotonic()
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
            if self._credentials and time.monotonic() - checked >= CREDENTIAL_CHECK:
                checked = time.monotonic()
                await self._cut_revoked()
            await asyncio.sleep(INTERVAL)

    async def _cut_revoked(self) -> None:
        tags = {tag for credential in self._credentials.values() for tag in credential}
        ids = {kind: sorted(t.split(":", 1)[1] for t in tags if t.startswith(f"{kind}:"))
               for kind in ("key", "token", "user")}
        try:
            dead = {r["tag"] for r in await adb.fetch(_DEAD, {"keys": ids["key"], "tokens": ids["token"],
                                                              "users": ids["user"]})}
        except Exception as exc:  # the database away: the streams go on, checked once it is back
            log.warning("job watcher could not check the watching credentials (%s); retrying", exc)
            return
        for queue, credential in list(self._credentials.items()):
            if dead.intersection(credential):
                queue.put_nowait(_CUT)


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    return {name: (utc_z(value) if isinstance(value, datetime) else value)
            for name, value in row.items() if name in FIELDS}


WATCHER = Watcher()


_open: Counter[str] = Counter()  # event streams open in this process, by the principal watching


def event_stream(job: dict[str, Any], watcher: Principal) -> AsyncIterator[bytes]:
    """JOB as server-sent events for WATCHER: for
    as long as its credential stays valid (`_credential`), and counted against its
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

    stream = _events(job, *_credential(watcher), release)
    weakref.finalize(stream, release)
    return stream


def _credential(watcher: Principal) -> tuple[tuple[str, ...], float | None]:
    """What WATCHER opened a stream with, as `_DEAD` checks it again (a key, or a token and its user),
    and when its bearer token expires (epoch seconds): the stream ends then, as the token would stop
    opening one. A person signed in at the identity provider logs out there, not here: only the expiry."""
    if watcher.kind == "key":
        return (f"key:{watcher.id}",), None
    if watcher.token_id is None:
        return (), watcher.expires
    return (f"token:{watcher.token_id}", f"user:{watcher.id}"), watcher.expires


async def _events(job: dict[str, Any], credential: tuple[str, ...], until: float | None,
                  release: Callable[[], None]) -> AsyncIterator[bytes]:
    """`job` for each change (the first at once), `end` once it has ended; a comment line after
    KEEPALIVE seconds of silence. The stream then closes."""
    try:
        yield b"retry: 2000\n\n"
        sequence = 0
        async for row in WATCHER.follow(job, credential, until):
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
