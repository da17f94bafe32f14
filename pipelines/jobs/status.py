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
from pipelines.core.pagination import capped_count
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


def storage(session: Session, admin: bool) -> dict:
    """Where Ingot keeps its files and how full it is. The server's own path only to an admin; the
    records counted to pagination.COUNT_CAP (past it, at least that many), never a whole table."""
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(settings.home)
    total = capped_count(session, select(Observation.id))
    return {
        "type": "postgresql",
        "path": str(settings.home) if admin else None,
        "available_bytes": usage.free,
        "total_records": total.count,
        "total_records_exact": total.exact,
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
class Histogram:
    buckets: dict[float, int]  # upper bound -> jobs that took at most that long
    count: int
    total: float


@dataclass(frozen=True)
class Counts:
    """What Prometheus is told: aggregated in PostgreSQL over what is kept, plus what retention deleted
    (pipelines.jobs.retention), so no counter goes backwards when old rows go."""

    jobs: dict[tuple[str, str], int]  # (kind, state) -> jobs
    durations: dict[str, Histogram]  # kind -> run times of finished jobs
    sources: list[tuple[str, int, int]]  # source, rows loaded, rows quarantined
    attempts: dict[str, int]  # webhook attempt outcome -> attempts
    deleted: dict[str, int]  # table -> rows deleted by retention
    paused_endpoints: int = 0  # webhook endpoints whose circuit is open


def counts() -> Counts:
    from pipelines.jobs.retention import DURATION_BUCKETS

    params = {"buckets": list(DURATION_BUCKETS)}
    with get_engine().connect() as conn:
        jobs = {(k, s): n for k, s, n in conn.execute(text("SELECT kind, state, count(*) FROM jobs GROUP BY 1, 2"))}
        totals = {k: (n, t) for k, n, t in conn.execute(text(
            "SELECT kind, count(*), COALESCE(sum(seconds), 0) FROM job_run_times GROUP BY kind"))}
        buckets: dict[str, dict[float, int]] = {}
        for kind, bound, n in conn.execute(text(
                "SELECT kind, bound, count(*) FILTER (WHERE seconds <= bound) FROM job_run_times "
                "CROSS JOIN unnest(CAST(:buckets AS float8[])) AS bound GROUP BY kind, bound"), params):
            buckets.setdefault(kind, {})[bound] = n
        attempts: dict[str, int] = dict(conn.execute(text(
            "SELECT ingot_attempt_outcome(status_code), count(*) FROM webhook_attempts GROUP BY 1")).tuples().all())
        sources = [tuple(r) for r in conn.execute(text("SELECT source, successful, failed FROM source_state"))]
        retired = conn.execute(text("SELECT metric, labels, value FROM retired_totals")).all()
        paused = conn.execute(text(
            "SELECT count(*) FROM webhooks WHERE paused_at IS NOT NULL AND enabled")).scalar_one()
    deleted: dict[str, int] = {}
    for metric, labels, value in retired:
        if metric == "jobs":
            jobs[(labels[0], labels[1])] = jobs.get((labels[0], labels[1]), 0) + int(value)
        elif metric == "job_duration_count":
            n, t = totals.get(labels[0], (0, 0.0))
            totals[labels[0]] = (n + int(value), t)
        elif metric == "job_duration_sum":
            n, t = totals.get(labels[0], (0, 0.0))
            totals[labels[0]] = (n, t + value)
        elif metric == "job_duration_bucket":
            kind_buckets = buckets.setdefault(labels[0], {})
            kind_buckets[float(labels[1])] = kind_buckets.get(float(labels[1]), 0) + int(value)
        elif metric == "webhook_attempts":
            attempts[labels[0]] = attempts.get(labels[0], 0) + int(value)
        elif metric == "retention_deleted":
            deleted[labels[0]] = int(value)
    durations = {kind: Histogram({b: buckets.get(kind, {}).get(b, 0) for b in DURATION_BUCKETS}, n, float(t))
                 for kind, (n, t) in totals.items()}
    return Counts(jobs, durations, sources, attempts, deleted, paused)


def oldest_queued() -> dict[str, float]:
    """Per queue, the seconds the oldest queued job has waited since it was created (0 when none waits):
    one indexed read of each kind's first waiting job (`ix_jobs_waiting`)."""
    from worker.queues import JOB_TASKS

    ages = {queue.value: 0.0 for _task, queue in JOB_TASKS.values()}
    with get_engine().connect() as conn:
        for kind, (_task, queue) in JOB_TASKS.items():
            age = conn.execute(text(
                "SELECT EXTRACT(EPOCH FROM now() - created_at) FROM jobs WHERE kind = :kind AND state = 'queued' "
                "ORDER BY send_seq LIMIT 1"), {"kind": str(kind)}).scalar()
            ages[queue.value] = max(ages[queue.value], float(age or 0))
    return ages


def host_stats() -> dict:
    """This API host's CPU (percent of all cores since the last call, and load), memory and disk under
    INGOT_HOME, for GET /api/v1/metrics."""
    import psutil

    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(get_settings().home)
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": psutil.cpu_count(),
            "load_average": list(psutil.getloadavg()),
            "memory": {"total_bytes": memory.total, "available_bytes": memory.available, "percent": memory.percent},
            "disk": {"path": "INGOT_HOME", "total_bytes": disk.total, "free_bytes": disk.free,
                     "percent": round(100 * disk.used / disk.total, 1) if disk.total else 0.0}}
