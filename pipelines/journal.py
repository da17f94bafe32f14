"""The journal: structured job and system events kept in PostgreSQL (what /api/v1/logs serves)."""

from __future__ import annotations

import json
import logging

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger("ingot.journal")
_COLUMNS = "INSERT INTO events (level, event, message, source, job_id, details) "


def record(conn, event: str, message: str, *, level: str = "info", source: str | None = None,
           job_id: str | None = None, details: dict | None = None) -> None:
    """Record an event in the transaction of CONN (a SQLAlchemy session or a psycopg connection)."""
    params = {"level": level, "event": event, "message": message, "source": source, "job_id": job_id,
              "details": json.dumps(details or {})}
    if isinstance(conn, Session):
        conn.execute(text(_COLUMNS + "VALUES (:level, :event, :message, :source, :job_id, CAST(:details AS jsonb))"),
                     params)
    else:
        conn.execute(_COLUMNS + "VALUES (%(level)s, %(event)s, %(message)s, %(source)s, %(job_id)s, "
                     "%(details)s::jsonb)", params)
    log.log(logging.getLevelName(level.upper()), message, extra={"event": event, "source": source, "job_id": job_id})
