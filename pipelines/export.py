"""Exports: rows streamed out of PostgreSQL and written batch by batch to CSV, Parquet or JSON Lines.

PostgreSQL streams the rows as CSV through `COPY (SELECT ...) TO STDOUT`, which pyarrow parses in C
into typed record batches (timestamps as timestamps, numbers as numbers); each batch is written out
and dropped, so memory stays flat whatever the row count. The file grows under a temporary name and
is renamed only when complete and checksummed, so a half-written file never looks finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql
from sqlalchemy import text

from pipelines.db import get_engine
from pipelines.jobs import JobFailed, JobRun
from pipelines.load import _json_values
from pipelines.settings import get_settings

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


def exports_dir() -> Path:
    path = get_settings().home / "exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def final_path(job_id: str, fmt: str) -> Path:
    """Where a finished export lives: named by the job id (from the database, never from a request)."""
    return exports_dir() / f"{job_id}.{FORMATS[fmt][1]}"


def _where(filters: dict) -> tuple[sql.Composable, dict]:
    clauses, params = [], {}
    if filters.get("source") is not None:
        clauses.append(sql.SQL("source = %(source)s"))
        params["source"] = filters["source"]
    dates = filters.get("date_range") or {}
    if dates.get("start") is not None:
        clauses.append(sql.SQL("timestamp >= %(start)s"))
        params["start"] = dates["start"]
    if dates.get("end") is not None:
        clauses.append(sql.SQL("timestamp <= %(end)s"))
        params["end"] = dates["end"]
    values = filters.get("value_range") or {}
    if values.get("min") is not None:
        clauses.append(sql.SQL("value >= %(min)s"))
        params["min"] = values["min"]
    if values.get("max") is not None:
        clauses.append(sql.SQL("value <= %(max)s"))
        params["max"] = values["max"]
    if not clauses:
        return sql.SQL("TRUE"), params
    return sql.SQL(" AND ").join(clauses), params


class _CopyReader(io.RawIOBase):
    """A psycopg COPY TO STDOUT stream as a file object pyarrow can read from."""

    def __init__(self, copy) -> None:
        self.copy = copy
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.copy.read()
            if not chunk:
                return 0
            self.pending = bytes(chunk)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def stream_rows(conn, columns: list[str], filters: dict) -> Iterator[pa.RecordBatch]:
    """Matching observations, in key order, as typed Arrow batches."""
    where, params = _where(filters)
    selected = [sql.SQL("metadata::text") if c == "metadata" else sql.Identifier(c) for c in columns]
    query = sql.SQL(
        "COPY (SELECT {cols} FROM observations WHERE {where} ORDER BY source, id) TO STDOUT (FORMAT csv)"
    ).format(cols=sql.SQL(", ").join(selected), where=where)
    cursor = conn.cursor()
    cursor.execute("SET LOCAL timezone = 'UTC'")
    cursor.execute("SET LOCAL datestyle = 'ISO'")
    cursor.execute("SET LOCAL extra_float_digits = 1")  # shortest text that reads back exactly
    with cursor.copy(query, params or None) as copy:
        try:
            reader = pacsv.open_csv(
                io.BufferedReader(_CopyReader(copy), buffer_size=READ_BLOCK),
                read_options=pacsv.ReadOptions(column_names=columns, block_size=READ_BLOCK, use_threads=True),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: COLUMN_TYPES[c] for c in columns},
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                    null_values=[""],
                ),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return  # no matching rows: the writer still leaves a valid file with its header
            raise
        yield from reader


def _text_timestamps(batch: pa.RecordBatch) -> pa.RecordBatch:
    """UTC timestamps as ISO 8601 text with Z (fast: formatted as naive values)."""
    arrays = []
    for array in batch.columns:
        if pa.types.is_timestamp(array.type):
            naive = array.cast(pa.timestamp("us")).cast(pa.string())
            array = pc.binary_join_element_wise(pc.replace_substring(naive, " ", "T"), pa.scalar("Z"), "")
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


class _Writer:
    def __init__(self, fmt: str, path: Path, columns: list[str]):
        self.fmt, self.columns = fmt, columns
        self.sink = path.open("wb")
        schema = pa.schema([(c, COLUMN_TYPES[c]) for c in columns])
        if fmt == "parquet":
            self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd")
        elif fmt == "csv":
            text_schema = pa.schema(
                [
                    (c, pa.string() if pa.types.is_timestamp(t) else t)
                    for c, t in zip(schema.names, schema.types, strict=True)
                ]
            )
            self.writer = pacsv.CSVWriter(self.sink, text_schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "parquet":
            self.writer.write_batch(batch)
        elif self.fmt == "csv":
            self.writer.write_batch(_text_timestamps(batch))
        else:
            self.sink.write(_jsonl(_text_timestamps(batch)))

    def close(self) -> None:
        if self.fmt in ("parquet", "csv"):
            self.writer.close()
        self.sink.close()


def _jsonl(batch: pa.RecordBatch) -> bytes:
    """One JSON object per row; metadata is inlined as the JSON object it already is."""
    parts = []
    for name, array in zip(batch.schema.names, batch.columns, strict=True):
        if name == "metadata":
            value = pc.fill_null(array, "null")
        else:
            value = _json_values(array)
        parts.append(pc.binary_join_element_wise(pa.scalar(json.dumps(name) + ":"), value, ""))
    if not parts or batch.num_rows == 0:
        return b""
    body = pc.binary_join_element_wise(*parts, ",") if len(parts) > 1 else parts[0]
    lines = pc.binary_join_element_wise(pa.scalar("{"), body, pa.scalar("}\n"), "")
    # The rows end to end are exactly the string array's data buffer between its first and last offset.
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]].tobytes()


def _check_space(directory: Path) -> None:
    needed = get_settings().export_min_free_bytes
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise JobFailed(
            f"not enough disk space for exports: {free / 2**20:,.0f} MiB free under {directory}, "
            f"{needed / 2**20:,.0f} MiB required"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def run(job: JobRun) -> dict:
    """Write the export of JOB; returns its result (row count, size, checksum, expiry)."""
    fmt = job.params["format"]
    columns = job.params.get("columns") or DEFAULT_COLUMNS
    filters = job.params.get("filters") or {}
    directory = exports_dir()
    _check_space(directory)
    job.restart()  # an export always starts over: the same data gives the same file
    part = directory / f".{job.id}.{job.lease}.part"
    for stale in directory.glob(f".{job.id}.*.part"):
        stale.unlink(missing_ok=True)
    rows = 0
    try:
        with get_engine().connect() as connection:
            conn = connection.connection.driver_connection
            where, params = _where(filters)
            total = conn.execute(
                sql.SQL("SELECT count(*) FROM observations WHERE {}").format(where), params
            ).fetchone()[0]
            writer = _Writer(fmt, part, columns)
            try:
                for batch in stream_rows(conn, columns, filters):
                    writer.write(batch)
                    rows += batch.num_rows
                    _check_space(directory)
                    with job.batch(
                        processed=batch.num_rows,
                        failed=0,
                        checkpoint={},
                        progress=int(99 * rows / total) if total else 0,
                    ):
                        pass
                    pa.default_memory_pool().release_unused()
            finally:
                writer.close()
        size = part.stat().st_size
        checksum = _sha256(part)
        os.replace(part, final_path(job.id, fmt))
    except OSError as exc:
        if getattr(exc, "errno", None) == 28:  # ENOSPC
            raise JobFailed(f"the disk under {directory} is full") from None
        raise
    finally:
        part.unlink(missing_ok=True)
    expires = datetime.now(UTC) + timedelta(days=get_settings().export_retention_days)
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
                "AND NOT (result ? 'expired_at') AND (result->>'expires_at')::timestamptz <= :now FOR UPDATE SKIP LOCKED"
            ),
            {"now": now},
        ).all()
        for job_id, result in rows:
            final_path(job_id, result["format"]).unlink(missing_ok=True)
            connection.execute(
                text(
                    "UPDATE jobs SET result = result || jsonb_build_object('expired_at', CAST(:now AS text)) WHERE id = :id"
                ),
                {"id": job_id, "now": now.isoformat()},
            )
            expired.append(job_id)
    return expired


def disk_usage() -> int:
    return sum(p.stat().st_size for p in exports_dir().iterdir() if p.is_file())
