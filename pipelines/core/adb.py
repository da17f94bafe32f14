"""The API's asynchronous path to PostgreSQL, for what runs on every request: who is calling, a job,
the ingestion status.

A request served this way makes no trip to a worker thread and back and opens no SQLAlchemy session:
a query costs a few microseconds of Python around its round trip. Everything else still goes through
`pipelines.core.db`, in a thread.

The pool is small and plain: at most `INGOT_DB_POOL_SIZE` connections per event loop, in autocommit
(each statement its own transaction), kept while they are healthy. It fails fast: with PostgreSQL
away, a new connection is refused at once and the caller answers 503 (the API maps
`psycopg.OperationalError` so), where a pool that retries in the background would hold each request
for its whole timeout. A connection found broken takes the idle ones with it (they broke together,
at a restart), and a read is tried once more on a fresh connection: once PostgreSQL is back, no
caller sees the restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from pipelines.core import embedded
from pipelines.core.db import dead_peer_args, sqlalchemy_url
from pipelines.core.loops import PerLoop
from pipelines.core.settings import get_settings

Params = Sequence[Any] | dict[str, Any]
CONNECT_TIMEOUT = 5  # seconds: a host that does not answer at all


class PoolExhausted(psycopg.OperationalError):
    """No connection came free in time (answered 503 like a database that is away)."""


class Pool:
    def __init__(self, url: str, size: int, wait: float = 10.0) -> None:
        self.url = url
        # Only the API uses these connections: every statement is time-limited as its requests' are.
        self.kwargs = {**dead_peer_args(url, get_settings().api_statement_timeout_ms),
                       "connect_timeout": CONNECT_TIMEOUT}
        self.size = size
        self.slots = asyncio.Semaphore(size)
        self.wait = wait
        self.idle: list[psycopg.AsyncConnection[DictRow]] = []

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        try:
            if self.slots.locked():  # wait for a free one, at most self.wait (a timer only when waiting)
                async with asyncio.timeout(self.wait):
                    await self.slots.acquire()
            else:
                await self.slots.acquire()
        except TimeoutError:
            raise PoolExhausted(f"no database connection came free within {self.wait:g} s") from None
        try:
            conn = self.idle.pop() if self.idle else await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, row_factory=dict_row, **self.kwargs)
            try:
                yield conn
            except psycopg.errors.QueryCanceled:  # past the time limit: the connection itself is fine
                await self._keep_or_discard(conn)
                raise
            except psycopg.OperationalError:
                await self._discard(conn)
                await self.clear()
                raise
            except BaseException:
                await self._keep_or_discard(conn)
                raise
            await self._keep_or_discard(conn)
        finally:
            self.slots.release()

    async def _keep_or_discard(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            self.idle.append(conn)
        else:
            await self._discard(conn)

    @staticmethod
    async def _discard(conn: psycopg.AsyncConnection[DictRow]) -> None:
        try:
            await conn.close()
        except psycopg.Error:
            pass

    async def clear(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            await self._discard(conn)


def conninfo() -> str:
    """The libpq URL of the database (the SQLAlchemy URL without its driver's name)."""
    return sqlalchemy_url(embedded.database_url(get_settings())).replace("postgresql+psycopg://", "postgresql://", 1)


_pools = PerLoop(lambda: Pool(conninfo(), get_settings().db_pool_size))


def in_use() -> tuple[int, int]:
    """(connections in use, connections idle) over every event loop's pool of this process."""
    pools = _pools.made()
    return (sum(p.size - p.slots._value for p in pools),  # noqa: SLF001  (a read, for metrics)
            sum(len(p.idle) for p in pools))


def pool() -> Pool:
    """This event loop's pool."""
    return _pools.get()


async def close() -> None:
    """Close this event loop's connections (the server is stopping)."""
    found = _pools.pop()
    if found is not None:
        await found.clear()


def _not_cancelled_midway(coro):
    """CORO run to its end even if its caller is cancelled (a request past its deadline): the caller
    stops waiting at once, while the statement finishes, or fails, on its own and its connection goes
    back to the pool. Cancelled midway instead, psycopg would ask the server to cancel the statement
    and wait for it to, which is no wait at all with a server that has stopped answering."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_settled)
    return asyncio.shield(task)


def _settled(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # the answer of a statement nobody waits for any more is nobody's error


async def fetch(query: str, params: Params = ()) -> list[dict[str, Any]]:
    """QUERY's rows as dicts; tried once more on a fresh connection if the one it met had broken."""
    return await _not_cancelled_midway(_fetch(query, params))


async def _fetch(query: str, params: Params) -> list[dict[str, Any]]:
    for attempt in (1, 2):
        try:
            async with pool().connection() as conn:
                cursor = await conn.execute(query, params, prepare=True)
                return await cursor.fetchall()
        except (PoolExhausted, psycopg.errors.QueryCanceled):  # not a broken connection: no second try
            raise
        except psycopg.OperationalError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def fetch_one(query: str, params: Params = ()) -> dict[str, Any] | None:
    rows = await fetch(query, params)
    return rows[0] if rows else None


async def write(query: str, params: Params = ()) -> dict[str, Any] | None:
    """Run a statement that changes something, once (no retry: it may have been applied); its first
    row returned, if any. (A caller cancelled meanwhile is not waited for, and the statement may
    still be applied, as with any request that timed out.)"""
    return await _not_cancelled_midway(_write(query, params))


async def _write(query: str, params: Params) -> dict[str, Any] | None:
    async with pool().connection() as conn:
        cursor = await conn.execute(query, params, prepare=True)
        return await cursor.fetchone() if cursor.description else None


async def execute(query: str, params: Params = ()) -> None:
    """Run a statement that changes something, once (no retry: it may have been applied)."""
    await _not_cancelled_midway(_execute(query, params))


async def _execute(query: str, params: Params) -> None:
    async with pool().connection() as conn:
        await conn.execute(query, params)
