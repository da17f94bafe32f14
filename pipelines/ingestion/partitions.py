"""One partition of `observations` per source, and the bulk path that fills a new one.

`observations` is partitioned by LIST (source). A source seen for the first time gets a fresh table
with no index at all: its batches are COPYed into it (each batch still commits with the job's
checkpoint), and at the end of the run the key and query indexes are built in one sort each, in
parallel, and the table is attached as the source's partition. Building an index once is several
times cheaper than keeping it up row by row, and a first load is where the rows are. A source that
already has its partition loads through it directly (see `pipelines.ingestion.load`).

Until it is attached, a new source's rows are not visible to queries: a first load appears whole.
A run that stops early (cancelled, a bad file) attaches what it committed; a worker killed mid-run
leaves the table to its resumed attempt, or, if the job gives up, to the source's next run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import Enum

import psycopg
from psycopg import sql

from pipelines.core.db import driver, get_engine

PARENT = "observations"
# The query's sort indexes, each (column, source, id), by the suffix of its name.
SORTED_BY = {"time": "timestamp", "value": "value", "ingested": "ingested_at"}
# Session memory for one index build; the sort stays in memory up to a few million rows.
_BUILD_MEMORY = "256MB"


class State(Enum):
    MISSING = "missing"
    DETACHED = "detached"  # a first load in progress, or one interrupted before its end
    ATTACHED = "attached"


# Advisory locks per source (two-key form: this name space, then the source) serialise its partition's DDL.
PARTITION_LOCKS = "ingot.partition"


def partition_name(source: str) -> str:
    """The table that holds SOURCE's rows: readable, unique (a hash tells `a-b` from `a_b`), and short
    enough (54 bytes) that its index names (`_key`, `_ingested`, `_pkey`, ...) stay within PostgreSQL's 63:
    longer ones are cut, and two cut alike would be one index."""
    slug = re.sub(r"[^a-z0-9_]", "_", source.lower())[:32]
    return f"{PARENT}_{slug}_{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def _lock(conn: psycopg.Connection, source: str) -> None:
    """Serialise partition changes for SOURCE until the end of the caller's transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (PARTITION_LOCKS, source))


def state(conn: psycopg.Connection, source: str) -> State:
    row = conn.execute(
        "SELECT i.inhparent IS NOT NULL FROM pg_class c "
        "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (partition_name(source),),
    ).fetchone()
    if row is None:
        return State.MISSING
    return State.ATTACHED if row[0] else State.DETACHED


def _create(conn: psycopg.Connection, source: str) -> None:
    """A table shaped like observations, holding only SOURCE, with no index yet."""
    table = sql.Identifier(partition_name(source))
    conn.execute(sql.SQL(
        "CREATE TABLE {t} (LIKE {p} INCLUDING DEFAULTS, CHECK (source = {s})) "
        # Nothing to vacuum while rows only arrive; autovacuum resumes once attached.
        "WITH (autovacuum_enabled = false)"
    ).format(t=table, p=sql.Identifier(PARENT), s=sql.Literal(source)))


def begin_bulk(conn: psycopg.Connection, source: str, job_id: str) -> bool:
    """Create SOURCE's unindexed table for JOB_ID's first load, in the caller's transaction.

    True if it was created (the source has no partition). Its `source` and `job_id` columns default
    to the load's own values, so the payload leaves them out (`BULK_COLUMNS`): two fewer values for
    PostgreSQL to read per row."""
    _lock(conn, source)
    if state(conn, source) is not State.MISSING:
        return False
    _create(conn, source)
    conn.execute(sql.SQL("ALTER TABLE {t} ALTER COLUMN source SET DEFAULT {s}, ALTER COLUMN job_id SET DEFAULT {j}")
                 .format(t=sql.Identifier(partition_name(source)), s=sql.Literal(source), j=sql.Literal(job_id)))
    return True


def ensure(conn: psycopg.Connection, source: str) -> None:
    """SOURCE's attached partition, created empty if missing, in the caller's transaction.

    A detached table left by an interrupted first load is finished and attached first."""
    _lock(conn, source)
    current = state(conn, source)
    if current is State.MISSING:
        _create(conn, source)
    if current is not State.ATTACHED:
        _build_indexes(conn, source)
        _attach(conn, source)


def _index_statements(source: str) -> list[sql.Composed]:
    """The partition's indexes, matching the parent's so that ATTACH adopts them instead of building."""
    name = partition_name(source)
    table = sql.Identifier(name)
    return [
        sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {i} ON {t} (id, source)").format(
            i=sql.Identifier(f"{name}_key"), t=table),
        *(sql.SQL("CREATE INDEX IF NOT EXISTS {i} ON {t} ({c}, source, id)").format(
            i=sql.Identifier(f"{name}_{suffix}"), t=table, c=sql.Identifier(column))
          for suffix, column in SORTED_BY.items()),
    ]


def _build_indexes(conn: psycopg.Connection, source: str) -> None:
    """Build whatever index SOURCE's table lacks, removing stale copies of keys first if need be."""
    key, *sorts = _index_statements(source)
    _index_build_settings(conn)
    try:
        with conn.transaction():
            conn.execute(key)
    except psycopg.errors.UniqueViolation:
        _dedupe(conn, source)
        conn.execute(key)
    for statement in sorts:
        conn.execute(statement)


def _index_build_settings(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("SET LOCAL maintenance_work_mem = {}").format(sql.Literal(_BUILD_MEMORY)))
    # Index builds run side by side already: a worker process each would only oversubscribe the cores.
    conn.execute("SET LOCAL max_parallel_maintenance_workers = 0")


def _dedupe(conn: psycopg.Connection, source: str) -> None:
    """Keep the last write of each key: batches of a run commit in order, each with its own `now()`.

    A first load has no key index to stop a key that comes back in a later batch (a corrected row
    in a later file), so both copies are in the table until this runs."""
    table = sql.Identifier(partition_name(source))
    conn.execute(sql.SQL(
        "DELETE FROM {t} AS t USING (SELECT ctid FROM (SELECT ctid, row_number() OVER "
        "(PARTITION BY id ORDER BY ingested_at DESC, ctid DESC) AS n FROM {t}) ranked WHERE n > 1) AS stale "
        "WHERE t.ctid = stale.ctid"
    ).format(t=table))


def _attach(conn: psycopg.Connection, source: str) -> None:
    name = partition_name(source)
    table = sql.Identifier(name)
    has_key = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'", (name,)
    ).fetchone()
    if not has_key:
        conn.execute(sql.SQL("ALTER TABLE {t} ADD CONSTRAINT {k} PRIMARY KEY USING INDEX {i}").format(
            t=table, k=sql.Identifier(f"{name}_pkey"), i=sql.Identifier(f"{name}_key")))
    conn.execute(sql.SQL("ALTER TABLE {t} RESET (autovacuum_enabled), ALTER COLUMN source DROP DEFAULT, "
                         "ALTER COLUMN job_id DROP DEFAULT").format(t=table))
    # The CHECK constraint proves every row belongs here, so ATTACH skips scanning the table.
    conn.execute(sql.SQL("ALTER TABLE {p} ATTACH PARTITION {t} FOR VALUES IN ({s})").format(
        p=sql.Identifier(PARENT), t=table, s=sql.Literal(source)))


def finish_bulk(source: str) -> None:
    """Index SOURCE's first load and attach it: the two index builds run at once, one connection each.

    Idempotent: a partition already attached is left as it is."""
    with _connection() as conn:
        with conn.transaction():
            detached = state(conn, source) is State.DETACHED
        key_built = _build_in_parallel(source) if detached else True
        with conn.transaction():
            if not key_built:  # keys came back in later batches: remove the stale copies, then build
                _lock(conn, source)
                _dedupe(conn, source)
            ensure(conn, source)


@contextmanager
def _connection() -> Iterator[psycopg.Connection]:
    with get_engine().connect() as connection:
        yield driver(connection)


def _build_in_parallel(source: str) -> bool:
    """Run the index builds side by side, then ANALYZE in whichever connection frees up first, so
    that the first queries after the load are planned on real statistics. False if the key index
    could not be built because a key occurs more than once."""
    def build(statement: sql.Composed) -> bool:
        try:
            with _connection() as conn, conn.transaction():
                _index_build_settings(conn)
                conn.execute(statement)
        except psycopg.errors.UniqueViolation:
            return False
        return True

    analyze = sql.SQL("ANALYZE {}").format(sql.Identifier(partition_name(source)))
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="index-build") as pool:
        built = [pool.submit(build, s) for s in [*_index_statements(source), analyze]]
        return all([done.result() for done in built])  # every result: an error in any build is raised
