"""Exports: rows streamed out of PostgreSQL in key order and written block by block.

Every format starts as one `COPY (SELECT ...) TO STDOUT` stream. CSV and JSON Lines are text that
PostgreSQL itself formats (RFC 4180 CSV; one JSON object per line, times as ISO 8601 UTC, numbers as
numbers, metadata as an object), gathered into large writes. Parquet needs types: pyarrow parses the
stream in C into record batches (timestamps as timestamps, numbers as numbers) and writes each one
out, zstd-compressed. Nothing holds more than a block, so memory stays flat whatever the row count.
The file grows under a temporary name, is checksummed on the way, and is renamed only when complete,
so a half-written file never looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql
from sqlalchemy import text

from pipelines.core import runtime
from pipelines.core.db import driver, get_engine
from pipelines.core.errors import Busy
from pipelines.core.prefetch import prefetch
from pipelines.core.settings import get_settings
from pipelines.exports import query
from pipelines.jobs.attempt import JobFailed, JobRun

log = logging.getLogger(__name__)

FORMATS = {
    "csv": ("text/csv", "csv"),
    "parquet": ("application/vnd.apache.parquet", "parquet"),
    "jsonl": ("application/x-ndjson", "jsonl"),
}
COLUMN_TYPES = {
    "id": pa.string(),
    "source": pa.string(),
    "timestamp": pa.timestamp("us", "UTC"),
    "value": pa.float64(),
    "metadata": pa.string(),
    "job_id": pa.string(),
    "ingested_at": pa.timestamp("us", "UTC"),
}
DEFAULT_COLUMNS = ["id", "source", "timestamp", "value", "metadata"]
READ_BLOCK = 4 * 1024 * 1024
WRITE_BLOCK = 1024 * 1024


def exports_dir() -> Path:
    path = get_settings().ensure_home() / "exports"
    if not path.exists():
        path.mkdir(exist_ok=True)
        path.chmod(0o700)
    return path


def final_path(job_id: str, fmt: str) -> Path:
    """Where a finished export lives: named by the job id (from the database, never from a request)."""
    return exports_dir() / f"{job_id}.{FORMATS[fmt][1]}"


def _where(filters: dict) -> tuple[sql.Composable, dict]:
    """The export's WHERE clause: the query API's own conditions, compiled with bound parameters."""
    from sqlalchemy import and_, true
    from sqlalchemy.dialects import postgresql

    compiled = and_(true(), *query.conditions(query.Query.from_filters(filters))).compile(
        dialect=postgresql.psycopg.dialect())
    return sql.SQL(str(compiled)), compiled.params


def _blocks(copy) -> Iterator[tuple[bytes, int]]:
    """COPY's rows (PostgreSQL sends one message per row) gathered into blocks of about WRITE_BLOCK
    bytes, with their row counts, read ahead in a thread so the database keeps streaming while the
    blocks are parsed or written."""

    def gather() -> Iterator[tuple[bytes, int]]:
        pending, size = [], 0
        for message in copy:
            pending.append(bytes(message))
            size += len(message)
            if size >= WRITE_BLOCK:
                yield b"".join(pending), len(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending), len(pending)

    return prefetch(gather(), depth=4)


class _BlockReader(io.RawIOBase):
    """Blocks of bytes as a file object pyarrow can read from."""

    def __init__(self, blocks: Iterator[tuple[bytes, int]]) -> None:
        self.blocks = blocks
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            block = next(self.blocks, None)
            if block is None:
                return 0
            self.pending = memoryview(block[0])
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


_ISO_UTC = """to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
# JSON never holds a raw control character, so CSV with these as quote and delimiter never quotes:
# each row comes out as its JSON text alone.
_AS_IS = sql.SQL("FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02'")


def _text_column(column: str) -> sql.Composable:
    """COLUMN as the text formats show it: times as uniform ISO 8601 UTC, metadata as JSON."""
    if column == "metadata":
        return sql.SQL("metadata::text")
    if pa.types.is_timestamp(COLUMN_TYPES[column]):
        return sql.SQL(_ISO_UTC).format(c=sql.Identifier(column))
    return sql.Identifier(column)


def _copy_sql(fmt: str, columns: list[str], filters: dict) -> tuple[sql.Composable, dict]:
    """The COPY of the matching rows, in key order, shaped for FMT."""
    where, params = _where(filters)
    if fmt == "jsonl":
        pairs = [sql.SQL("{}, {}").format(sql.Literal(c), sql.SQL("metadata") if c == "metadata" else
                                           _text_column(c)) for c in columns]
        selected = sql.SQL("json_build_object({})::text").format(sql.SQL(", ").join(pairs))
        options = _AS_IS
    elif fmt == "csv":
        selected = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(_text_column(c), sql.Identifier(c)) for c in columns)
        options = sql.SQL("FORMAT csv, HEADER")
    else:  # parquet: plain CSV for pyarrow to parse into types
        selected = sql.SQL(", ").join(
            sql.SQL("metadata::text") if c == "metadata" else sql.Identifier(c) for c in columns)
        options = sql.SQL("FORMAT csv")
    query = sql.SQL("COPY (SELECT {sel} FROM observations WHERE {where} ORDER BY id, source) TO STDOUT ({opts})")
    return query.format(sel=selected, where=where, opts=options), params


def _session_formats(cursor) -> None:
    cursor.execute("SET LOCAL timezone = 'UTC'")
    cursor.execute("SET LOCAL datestyle = 'ISO'")
    cursor.execute("SET LOCAL extra_float_digits = 1")  # shortest text that reads back exactly


def stream_rows(conn, columns: list[str], filters: dict) -> Iterator[pa.RecordBatch]:
    """Matching observations, in key order, as typed Arrow batches."""
    query, params = _copy_sql("parquet", columns, filters)
    cursor = conn.cursor()
    _session_formats(cursor)
    with cursor.copy(query, params or None) as copy:
        blocks = _blocks(copy)
        first = next(blocks, None)
        if first is None:
            return  # no matching rows: the writer still leaves a valid file with its header
        reader = pacsv.open_csv(
            io.BufferedReader(_BlockReader(itertools.chain([first], blocks)), buffer_size=READ_BLOCK),
            read_options=pacsv.ReadOptions(column_names=columns, block_size=READ_BLOCK, use_threads=True),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: COLUMN_TYPES[c] for c in columns},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                null_values=[""],
            ),
        )
        yield from reader


def copy_text(fmt: str, conn, columns: list[str], filters: dict, sink, on_rows) -> int:
    """CSV or JSON Lines as PostgreSQL formats them, straight to SINK in large writes; ON_ROWS(n)
    reports progress. Returns the exact row count."""
    query, params = _copy_sql(fmt, columns, filters)
    cursor = conn.cursor()
    _session_formats(cursor)
    with cursor.copy(query, params or None) as copy:
        for block, rows in _blocks(copy):
            sink.write(block)
            on_rows(rows)
    return cursor.rowcount  # exact, from PostgreSQL's "COPY n"


class _ParquetWriter:
    """Typed record batches into a zstd Parquet file, checksummed as it is written."""

    def __init__(self, path: Path, columns: list[str]):
        self.sink = _HashingFile(path)
        schema = pa.schema([(c, COLUMN_TYPES[c]) for c in columns])
        # Dictionaries only where values repeat: ids and metadata are near-unique, and encoding them
        # as dictionaries doubles the write time and grows the file.
        self.parquet = pq.ParquetWriter(self.sink, schema, compression="zstd",
                                        use_dictionary=[c for c in columns if c in ("source", "job_id")])

    def write(self, batch: pa.RecordBatch) -> None:
        self.parquet.write_batch(batch)

    def close(self) -> None:
        self.parquet.close()
        self.sink.close()


class DiskFull(Busy):
    """Less free space under the exports folder than `INGOT_EXPORT_MIN_FREE_BYTES`."""


def check_space(directory: Path) -> None:
    """DiskFull unless DIRECTORY's disk has the free space an export needs to start."""
    needed = get_settings().export_min_free_bytes
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFull(f"not enough disk space for exports: {free / 2**20:,.0f} MiB free, "
                       f"{needed / 2**20:,.0f} MiB required")


def _space_or_fail(directory: Path) -> None:
    try:
        check_space(directory)
    except DiskFull as exc:
        raise JobFailed(str(exc)) from None


class _HashingFile(io.RawIOBase):
    """A file being written whose SHA-256 is computed on the way (no second read of the file)."""

    def __init__(self, path: Path):
        self.file = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")  # owner only
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        super().close()


def _estimate(conn, filters: dict) -> int:
    """The planner's row estimate: enough for a progress bar, free next to a count(*)."""
    where, params = _where(filters)
    plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM observations WHERE {}").format(where),
                        params).fetchone()[0]
    return int(plan[0]["Plan"]["Plan Rows"])


class _Progress:
    """Reports rows written at most every half second (the heartbeat covers liveness between), and
    checks the disk each time."""

    INTERVAL = 0.5

    def __init__(self, job: JobRun, estimate: int, directory: Path):
        self.job, self.estimate, self.directory = job, estimate, directory
        self.rows = self.reported = 0
        self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.rows += rows
        if time.monotonic() - self.last >= self.INTERVAL:
            self.report(self.rows)

    def report(self, count: int) -> None:
        """Record COUNT rows written (the last report, with the exact count, corrects any estimate)."""
        _space_or_fail(self.directory)
        share = min(count / self.estimate, 1.0) if self.estimate else 0.0
        with self.job.batch(processed=count - self.reported, failed=0, checkpoint={}, progress=int(99 * share)):
            pass
        self.reported, self.last = count, time.monotonic()


def run(job: JobRun) -> dict:
    """Write the export of JOB; returns its result (row count, size, checksum, expiry)."""
    fmt = job.params["format"]
    columns = job.params.get("columns") or DEFAULT_COLUMNS
    filters = job.params.get("filters") or {}
    directory = exports_dir()
    _space_or_fail(directory)
    job.restart()  # an export always starts over: the same data gives the same file
    part = directory / f".{job.id}.{job.lease}.part"
    for stale in directory.glob(f".{job.id}.*.part"):
        stale.unlink(missing_ok=True)
    try:
        with get_engine().connect() as connection:
            conn = driver(connection)
            progress = _Progress(job, _estimate(conn, filters), directory)
            if fmt in ("csv", "jsonl"):
                sink = _HashingFile(part)
                try:
                    rows = copy_text(fmt, conn, columns, filters, sink, progress.add)
                finally:
                    sink.close()
            else:
                writer = _ParquetWriter(part, columns)
                rows = 0
                try:
                    for batch in stream_rows(conn, columns, filters):
                        writer.write(batch)
                        rows += batch.num_rows
                        progress.add(batch.num_rows)
                        pa.default_memory_pool().release_unused()
                finally:
                    writer.close()
                sink = writer.sink
            progress.report(rows)
        size, checksum = sink.size, sink.digest.hexdigest()
        os.replace(part, final_path(job.id, fmt))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise JobFailed(f"the disk under {directory} is full") from None
        raise
    finally:
        part.unlink(missing_ok=True)
    expires = datetime.now(UTC) + timedelta(days=runtime.value("export_retention_days"))
    return {
        "row_count": rows,
        "file_size": size,
        "checksum": f"sha256:{checksum}",
        "format": fmt,
        "columns": columns,
        "filename": final_path(job.id, fmt).name,
        "expires_at": expires.isoformat(),
    }


def expire(now: datetime | None = None) -> list[str]:
    """Delete finished exports past their expiry and mark their jobs expired."""
    now = now or datetime.now(UTC)
    expired = []
    with get_engine().begin() as connection:
        rows = connection.execute(
            text(
                "SELECT id, result FROM jobs WHERE kind = 'export' AND state = 'succeeded' "
                "AND NOT (result ? 'expired_at') AND (result->>'expires_at')::timestamptz <= :now "
                "FOR UPDATE SKIP LOCKED"
            ),
            {"now": now},
        ).all()
        for job_id, result in rows:
            final_path(job_id, result["format"]).unlink(missing_ok=True)
            connection.execute(
                text(
                    "UPDATE jobs SET result = result || jsonb_build_object('expired_at', CAST(:now AS text)) "
                    "WHERE id = :id"
                ),
                {"id": job_id, "now": now.isoformat()},
            )
            expired.append(job_id)
    return expired


def disk_usage() -> int:
    return sum(p.stat().st_size for p in exports_dir().iterdir() if p.is_file())
