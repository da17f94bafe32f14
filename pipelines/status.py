"""What the system is doing now: the facts behind /ready, /status and /ingestion/status."""

from __future__ import annotations

import shutil

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pipelines.db import get_engine
from pipelines.models import ACTIVE_STATES, FINAL_STATES, Job, Observation
from pipelines.settings import get_settings


def database_ok() -> bool:
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def database_stats(session: Session) -> dict:
    pool = get_engine().pool
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
    from pipelines.export import disk_usage

    return disk_usage()
