"""An ingestion run: every file of every requested source, batch by batch, resumable.

Each batch commits its rows, its quarantined rows and the job's checkpoint together, so an attempt
that resumes after a killed worker skips exactly what was committed and redoes the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa

from pipelines.jobs import JobFailed, JobRun
from pipelines.load import Loader, prepare, quarantine
from pipelines.prefetch import prefetch
from pipelines.settings import get_settings
from pipelines.sources.files import read_file
from pipelines.sources.registry import Registry, SourceError, load_registry
from pipelines.validate import validate

log = logging.getLogger(__name__)


def current_registry() -> Registry:
    settings = get_settings()
    return load_registry(settings.sources_file, settings.data_root_paths)


def display_path(registry: Registry, path: Path) -> str:
    return str(path.relative_to(registry.base_dir)) if path.is_relative_to(registry.base_dir) else str(path)


def _position(checkpoint: dict) -> tuple[int, int, int]:
    return (checkpoint.get("source", 0), checkpoint.get("file", 0), checkpoint.get("batch", 0))


def run(job: JobRun, registry: Registry | None = None) -> dict:
    registry = registry or current_registry()
    sources: list[str] = job.params["sources"]
    batch_rows = int(job.params.get("options", {}).get("batch_size") or get_settings().batch_size)
    stats: dict[str, dict] = job.checkpoint.get("stats", {})
    done = _position(job.checkpoint)
    for s_index, source_id in enumerate(sources):
        if s_index < done[0]:
            continue
        source_stats = stats.setdefault(source_id, {"files": 0, "records": 0, "failed": 0, "error": None})
        try:
            _ingest_source(job, registry, source_id, s_index, done, batch_rows, stats)
        except SourceError as exc:
            source_stats["error"] = str(exc)
        _finish_source(job, source_id, s_index, stats)
    result = {"sources": stats}
    job.result = result
    errors = [s["error"] for s in stats.values() if s.get("error")]
    if errors:
        raise JobFailed("; ".join(errors))
    return result


def _ingest_source(job, registry, source_id, s_index, done, batch_rows, stats) -> None:
    source = registry.get(source_id)
    files = registry.files(source)
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes) or 1
    source_stats = stats[source_id]
    loader = Loader()

    def prepared(f_index: int, path: Path):
        """Batches still to do in PATH, validated and serialised (run ahead in a thread)."""
        for b_index, raw in enumerate(read_file(source, path, batch_rows)):
            if (s_index, f_index, b_index) < done:
                continue
            valid = validate(source, raw)
            yield b_index, raw.fraction, valid, prepare(source_id, job.id, valid)

    for f_index, path in enumerate(files):
        if (s_index, f_index) < done[:2]:
            continue
        name = display_path(registry, path)
        before = sum(sizes[:f_index])
        for b_index, fraction, valid, payload in prefetch(prepared(f_index, path), depth=1):
            source_stats["records"] += valid.num_rows
            source_stats["failed"] += len(valid.rejects)
            share = (s_index + (before + fraction * sizes[f_index]) / total) / len(job.params["sources"])
            checkpoint = {"source": s_index, "file": f_index, "batch": b_index + 1, "stats": stats}
            with job.batch(
                processed=valid.num_rows, failed=len(valid.rejects), checkpoint=checkpoint, progress=int(99 * share)
            ) as conn:
                loader.load(conn, payload)
                quarantine(conn, source_id, job.id, name, valid.rejects)
            del valid, payload
            # Hand freed batch memory back to the OS, so RSS stays flat whatever the input size.
            pa.default_memory_pool().release_unused()
        source_stats["files"] = f_index + 1


def _finish_source(job: JobRun, source_id: str, s_index: int, stats: dict) -> None:
    """Record the source's outcome and move the checkpoint past it, in one transaction."""
    source_stats = stats[source_id]
    checkpoint = {"source": s_index + 1, "file": 0, "batch": 0, "stats": stats}
    with job.batch(processed=0, failed=0, checkpoint=checkpoint, progress=0) as conn:
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
    log.info("source %s done: %s", source_id, source_stats)
