"""An ingestion run: every batch of every requested source, resumable, incremental when asked.

Each batch commits its rows, its quarantined rows, the source's cursor and the job's checkpoint in one
transaction, so an attempt that resumes after a killed worker carries on from exactly what was
committed: nothing skipped, nothing counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import nullcontext

import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy import text

from pipelines.core import cache, runtime
from pipelines.core.db import get_engine
from pipelines.core.prefetch import prefetch
from pipelines.core.settings import get_settings
from pipelines.curves.queries import CACHE_GROUP as CURVES_CACHE
from pipelines.exports.query import TOTALS as QUERY_TOTALS
from pipelines.ingestion.datasets import CURVES
from pipelines.ingestion.load import loading
from pipelines.ingestion.load_curves import CurveLoader
from pipelines.ingestion.quarantine import Book
from pipelines.ingestion.sources import files, fingerprints, http
from pipelines.ingestion.sources.batches import Piece
from pipelines.ingestion.sources.registry import Registry, SourceConfig, SourceError, load_registry
from pipelines.ingestion.validate import Cursor, effective_types, validate
from pipelines.jobs import journal
from pipelines.jobs.attempt import JobFailed, JobRun

log = logging.getLogger(__name__)

# How each cursor type compares in SQL (the state is kept as text).
_CURSOR_SQL = {"datetime": "timestamptz", "date": "date", "int": "numeric", "float": "double precision",
               "string": "text"}


def current_registry() -> Registry:
    settings = get_settings()
    return load_registry(settings.sources_file, settings.data_root_paths, settings.home)


def pieces(source: SourceConfig, registry: Registry, batch_rows: int, resume: dict | None,
           since: Cursor | None, seen: fingerprints.Seen | None = None) -> Iterator[Piece]:
    """The batches of SOURCE from its connector, after the committed position RESUME."""
    if source.type == "file":
        return files.stream(source, registry, batch_rows, resume, seen)
    return http.stream(source, resume, since.value if since else None)


def run(job: JobRun, registry: Registry | None = None) -> dict:
    registry = registry or current_registry()
    sources: list[str] = job.params["sources"]
    options = job.params.get("options", {})
    batch_rows = int(options.get("batch_size") or runtime.value("batch_size"))
    incremental = options.get("mode", "incremental") == "incremental"
    force = bool(options.get("force"))
    stats: dict[str, dict] = job.checkpoint.get("stats", {})
    for s_index, source_id in enumerate(sources):
        if s_index < job.checkpoint.get("source", 0):
            continue
        resuming = job.checkpoint.get("source") == s_index
        source_stats = stats.setdefault(
            source_id, {"records": 0, "failed": 0, "skipped": 0, "batches": 0, "error": None}
        )
        try:
            source = registry.get(source_id)
            since = None
            if source.cursor and resuming and job.checkpoint.get("since"):
                since = Cursor(job.checkpoint["since"]["value"], frozenset(job.checkpoint["since"]["ids"]))
            elif source.cursor and incremental and not resuming:
                since = _cursor_state(source_id)
            _ingest_source(job, registry, source, s_index, since, batch_rows, stats, force)
        except SourceError as exc:
            source_stats["error"] = str(exc)
        _finish_source(job, source_id, s_index, stats)
    result = {"sources": stats, "mode": "incremental" if incremental else "full", "force": force}
    job.result = result
    errors = [s["error"] for s in stats.values() if s.get("error")]
    if errors:
        raise JobFailed("; ".join(errors))
    return result


def _cursor_state(source_id: str) -> Cursor | None:
    with get_engine().connect() as conn:
        row = conn.execute(
            text("SELECT cursor_value, cursor_ids FROM source_state WHERE source = :s"), {"s": source_id}
        ).one_or_none()
    if row is None or row.cursor_value is None:
        return None
    return Cursor(row.cursor_value, frozenset(row.cursor_ids))


def _ingest_source(job, registry, source, s_index, since, batch_rows, stats, force) -> None:
    source_stats = stats[source.id]
    resuming = job.checkpoint.get("source") == s_index
    resume = job.checkpoint.get("resume") if resuming else None
    if source.type == "file":
        source_stats["files"] = len(registry.files(source))
    # The run's threshold, as every checkpoint of this source records it (fixed for the whole run).
    since_state = {"value": since.value, "ids": sorted(since.ids)} if since else None
    cursor_type = _CURSOR_SQL.get(effective_types(source).get(source.cursor or "", "string"), "text")

    # Files unchanged since they were last read are skipped, unless the run is forced (`fingerprints`).
    seen = fingerprints.seen(source, force, past_cursor=since is not None) if source.type == "file" else None
    book = Book.open(source.id, job.id)
    curves = source.dataset == CURVES.name
    unchanged_before = source_stats.get("unchanged_rows", 0)  # counted by an earlier attempt of this run
    with (nullcontext(CurveLoader(source.id, job.id)) if curves
          else loading(source.id, job.id, resuming, force)) as loader:

        def prepared():
            """Batches validated and serialised, one ahead in a thread while the database loads."""
            for piece in pieces(source, registry, batch_rows, resume, since, seen):
                valid = validate(source, piece.raw, since)
                yield piece, valid, loader.prepare(valid)

        for piece, valid, payload in prefetch(prepared(), depth=1):
            source_stats["records"] += valid.num_rows
            source_stats["failed"] += len(valid.rejects)
            source_stats["skipped"] += valid.skipped
            source_stats["batches"] += 1
            for note in piece.raw.notes:
                source_stats.setdefault("notes", []).append(f"{piece.label}: {note}")
            checkpoint = {"source": s_index, "resume": piece.position, "stats": stats, "since": since_state}
            progress = (None if piece.progress is None
                        else int(99 * (s_index + piece.progress) / len(job.params["sources"])))
            with job.batch(processed=valid.num_rows, failed=len(valid.rejects), checkpoint=checkpoint,
                           progress=progress) as conn:
                loader.load(conn, payload)
                if loader.unchanged_rows:  # rows the table already held as they are, left out of the merge
                    source_stats["unchanged_rows"] = unchanged_before + loader.unchanged_rows
                book.record(conn, piece.label, valid.rejects, valid.lines)
                if valid.cursor_max is not None:
                    _advance_cursor(conn, source.id, valid.cursor_max, valid.cursor_max_ids, cursor_type)
                if piece.file_done is not None:
                    fingerprints.record(conn, source.id, piece.label, piece.file_done, since is None, job.id)
            if valid.num_rows:  # committed: what the curves cover, or how many rows a query matches, changed
                cache.drop(CURVES_CACHE if curves else QUERY_TOTALS)
            del valid, payload
            # Hand freed batch memory back to the OS, so RSS stays flat whatever the input size.
            pa.default_memory_pool().release_unused()
    if seen is not None and seen.skipped:
        source_stats["unchanged"] = sorted(set(source_stats.get("unchanged", [])) | set(seen.skipped))
        source_stats.setdefault("notes", []).append(
            f"{len(seen.skipped)} file(s) unchanged since their last load, skipped (force to read them again)")


def _advance_cursor(conn, source_id: str, value: str, ids: list[str], cursor_type: str) -> None:
    """Raise the source's committed cursor to VALUE (never lower it), with the ids of the rows at that
    value, in the batch's transaction."""
    statement = sql.SQL(
        "INSERT INTO source_state (source, status, cursor_value, cursor_ids, successful, failed, skipped) "
        "VALUES (%(s)s, 'running', %(v)s, %(ids)s, 0, 0, 0) ON CONFLICT (source) DO UPDATE SET "
        "cursor_ids = CASE WHEN source_state.cursor_value::{t} = EXCLUDED.cursor_value::{t} "
        "THEN source_state.cursor_ids || EXCLUDED.cursor_ids ELSE EXCLUDED.cursor_ids END, "
        "cursor_value = EXCLUDED.cursor_value "
        "WHERE source_state.cursor_value IS NULL OR source_state.cursor_value::{t} <= EXCLUDED.cursor_value::{t}"
    ).format(t=sql.SQL(cursor_type))
    conn.execute(statement, {"s": source_id, "v": value, "ids": Jsonb(ids)})


def _finish_source(job: JobRun, source_id: str, s_index: int, stats: dict) -> None:
    """Record the source's outcome and move the checkpoint past it, in one transaction."""
    source_stats = stats[source_id]
    checkpoint = {"source": s_index + 1, "stats": stats}
    with job.batch(processed=0, failed=0, checkpoint=checkpoint, progress=None) as conn:
        conn.execute(
            "INSERT INTO source_state (source, status, last_sync, last_job_id, last_error, successful, failed) "
            "VALUES (%(s)s, %(status)s, now(), %(job)s, %(error)s, %(ok)s, %(bad)s) "
            "ON CONFLICT (source) DO UPDATE SET status = EXCLUDED.status, last_sync = EXCLUDED.last_sync, "
            "last_job_id = EXCLUDED.last_job_id, last_error = EXCLUDED.last_error, "
            "successful = source_state.successful + EXCLUDED.successful, "
            "failed = source_state.failed + EXCLUDED.failed",
            {
                "s": source_id,
                "status": "error" if source_stats["error"] else "ok",
                "job": job.id,
                "error": source_stats["error"],
                "ok": source_stats["records"],
                "bad": source_stats["failed"],
            },
        )
        if source_stats["error"]:
            journal.record(conn, "source.failed", source_stats["error"], level="error", source=source_id,
                           job_id=job.id)
        else:
            journal.record(conn, "source.ingested",
                           f"{source_id}: {source_stats['records']} records, {source_stats['failed']} quarantined, "
                           f"{source_stats['skipped']} already loaded", source=source_id, job_id=job.id,
                           details=source_stats)
    cache.drop(QUERY_TOTALS)  # a first load's rows appear when its table is attached, after the last batch
