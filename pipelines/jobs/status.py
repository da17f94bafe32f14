"""What the system is doing now: the facts behind /ready, /status and /ingestion/status."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import cast

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from pipelines.core.db import get_engine
from pipelines.core.models import ACTIVE_STATES, FINAL_STATES, Job, Observation
from pipelines.core.settings import get_settings


def database_ok() -> bool:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def database_stats(session: Session) -> dict:
    pool = cast(QueuePool, get_engine().pool)
    active = session.execute(
        text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'")
    ).scalar_one()
    return {"connected": True, "pool_size": pool.size(), "active_connections": active}


def ingestion_cycles(session: Session) -> dict:
    finished = select(Job).where(Job.kind == "ingestion", Job.state.in_(FINAL_STATES)).subquery()
    row = session.execute(
        select(
            func.count(),
            func.count().filter(finished.c.state == "failed"),
            func.max(finished.c.finished_at),
        ).select_from(finished)
    ).one()
    running = session.scalar(
        select(func.count()).where(Job.kind == "ingestion", Job.state.in_(ACTIVE_STATES))
    )
    return {"is_running": bool(running), "cycles_completed": row[0], "errors_count": row[1], "last_cycle": row[2]}


def storage(session: Session) -> dict:
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(settings.home)
    total = session.scalar(select(func.count()).select_from(Observation))
    return {
        "type": "postgresql",
        "path": str(settings.home),
        "available_bytes": usage.free,
        "total_records": total,
        "exports_bytes": export_bytes(),
    }


def export_bytes() -> int:
    from pipelines.exports.export import disk_usage

    return disk_usage()


@dataclass(frozen=True)
class Throughput:
    records_per_second: float  # ingestion over the last hour, per second of job run time
    error_rate: float  # quarantined / (loaded + quarantined), over the last hour
    active_jobs: int  # of every kind, queued, running or cancelling


def throughput(session: Session) -> Throughput:
    hour = session.execute(text(
        "SELECT COALESCE(sum(records_processed), 0), COALESCE(sum(records_failed), 0), "
        "COALESCE(sum(extract(epoch FROM finished_at - started_at)), 0) FROM jobs "
        "WHERE kind = 'ingestion' AND finished_at > now() - interval '1 hour'")).one()
    processed, failed, seconds = int(hour[0]), int(hour[1]), float(hour[2])
    active = session.scalar(select(func.count()).where(Job.state.in_(ACTIVE_STATES))) or 0
    return Throughput(
        records_per_second=round(processed / seconds, 1) if seconds else 0.0,
        error_rate=round(failed / (processed + failed), 4) if processed + failed else 0.0,
        active_jobs=active,
    )


@dataclass(frozen=True)
class Counts:
    """What Prometheus is told, read where it is recorded."""

    jobs: list[tuple[str, str, int]]  # kind, state, count
    durations: list[tuple[str, float]]  # kind, seconds, of every finished job
    sources: list[tuple[str, int, int]]  # source, rows loaded, rows quarantined
    attempts: list[tuple[str, int]]  # webhook attempt outcome, count


def counts() -> Counts:
    with get_engine().connect() as conn:
        return Counts(
            jobs=[tuple(r) for r in conn.execute(text("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state"))],
            durations=[(k, float(s)) for k, s in conn.execute(text(
                "SELECT kind, extract(epoch FROM finished_at - started_at) FROM jobs "
                "WHERE finished_at IS NOT NULL AND started_at IS NOT NULL"))],
            sources=[tuple(r) for r in conn.execute(text("SELECT source, successful, failed FROM source_state"))],
            attempts=[tuple(r) for r in conn.execute(text(
                "SELECT CASE WHEN status_code BETWEEN 200 AND 299 THEN 'success' "
                "WHEN status_code IS NULL THEN 'error' ELSE 'http_' || status_code END, count(*) "
                "FROM webhook_attempts GROUP BY 1"))],
        )
