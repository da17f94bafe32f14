"""Jobs: one model for every kind of background work."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, or_, select

from api.deps import ReadKey, SessionDep
from api.envelope import ApiError, Envelope, ok
from api.schemas import JobList, JobOut
from pipelines import pagination
from pipelines.models import Job

router = APIRouter(prefix="/jobs", tags=["jobs"])
Kind = Literal["ingestion", "export", "scenario_run"]
State = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]


@router.get("", response_model=Envelope[JobList])
def list_jobs(
    request: Request,
    session: SessionDep,
    _key: ReadKey,
    kind: Kind | None = None,
    state: State | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> dict:
    query = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if kind:
        query = query.where(Job.kind == kind)
    if state:
        query = query.where(Job.state == state)
    if cursor:
        try:
            created, job_id = pagination.decode(cursor, 2)
            created = datetime.fromisoformat(created)
        except (pagination.BadCursor, TypeError, ValueError):
            raise ApiError(422, "cursor is not valid") from None
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(query))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = pagination.encode([rows[-1].created_at.isoformat(), rows[-1].id]) if more else None
    return ok(request, {"jobs": [JobOut.of(j) for j in rows]}, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Envelope[JobOut])
def get_job(job_id: str, request: Request, session: SessionDep, _key: ReadKey) -> dict:
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, f"no job '{job_id}'")
    return ok(request, JobOut.of(job))
