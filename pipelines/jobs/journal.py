"""The journal: structured job and system events kept in PostgreSQL (what /api/v1/logs serves)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from pipelines.core.models import Event
from pipelines.core.pagination import Keyset

log = logging.getLogger("ingot.journal")
_COLUMNS = "INSERT INTO events (level, event, message, source, job_id, details) "


def record(conn, event: str, message: str, *, level: str = "info", source: str | None = None,
           job_id: str | None = None, details: dict | None = None) -> None:
    """Record an event in the transaction of CONN (a SQLAlchemy session or connection, or a psycopg
    connection)."""
    params = {"level": level, "event": event, "message": message, "source": source, "job_id": job_id,
              "details": json.dumps(details or {})}
    if isinstance(conn, Session | Connection):
        conn.execute(text(_COLUMNS + "VALUES (:level, :event, :message, :source, :job_id, CAST(:details AS jsonb))"),
                     params)
    else:
        conn.execute(_COLUMNS + "VALUES (%(level)s, %(event)s, %(message)s, %(source)s, %(job_id)s, "
                     "%(details)s::jsonb)", params)
    log.log(logging.getLevelName(level.upper()), message, extra={"event": event, "source": source, "job_id": job_id})


NEWEST_FIRST = Keyset((Event.id,), descending=True)


@dataclass(frozen=True)
class Filter:
    level: str | None = None
    source: str | None = None
    job_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None


def listing(session: Session, where: Filter, before_id: int | None, limit: int) -> tuple[list[Event], int | None]:
    """Events newest first, matching WHERE, older than BEFORE_ID: (rows, the id to continue before)."""
    query = select(Event)
    for column, value in ((Event.level, where.level), (Event.source, where.source), (Event.job_id, where.job_id)):
        if value is not None:
            query = query.where(column == value)
    if where.start:
        query = query.where(Event.created_at >= where.start)
    if where.end:
        query = query.where(Event.created_at <= where.end)
    rows, last = NEWEST_FIRST.fetch(session, query, None if before_id is None else [before_id], limit)
    return rows, None if last is None else last[0]
