"""Jobs as callers look them up: one by id, pages of them, and the ingestion overview."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipelines.core.models import ACTIVE_STATES, FINAL_STATES, Job, JobKind, JobState
from pipelines.core.pagination import Keyset

NEWEST_FIRST = Keyset((Job.created_at, Job.id), descending=True)


def get(session: Session, job_id: str, kind: JobKind | None = None) -> Job | None:
    """The job JOB_ID (of KIND, when given), or None."""
    job = session.get(Job, job_id)
    return job if job is not None and (kind is None or job.kind == kind) else None


def page(session: Session, *, kind: JobKind | None, state: JobState | None, cursor: str | None, limit: int
         ) -> tuple[list[Job], str | None]:
    """Jobs newest first, filtered; BadCursor for a cursor that is not ours."""
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if state:
        query = query.where(Job.state == state)
    return NEWEST_FIRST.page(session, query, cursor, limit)


@dataclass(frozen=True)
class IngestionOverview:
    current: Job | None  # the newest ingestion still queued, running or cancelling
    last: Job | None  # the ingestion that ended last


def ingestion_overview(session: Session) -> IngestionOverview:
    ingestion = select(Job).where(Job.kind == JobKind.INGESTION)
    current = session.scalars(ingestion.where(Job.state.in_(ACTIVE_STATES))
                              .order_by(Job.created_at.desc()).limit(1)).first()
    last = session.scalars(ingestion.where(Job.state.in_(FINAL_STATES))
                           .order_by(Job.finished_at.desc()).limit(1)).first()
    return IngestionOverview(current, last)
