"""Jobs: one model for every kind of background work."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from sqlalchemy import select

from api.deps import ReadKey, SessionDep, WriteKey
from api.envelope import ApiError, Envelope, ok
from api.routes import newest_first_page
from api.schemas import JobList, JobOut
from pipelines import jobs, journal
from pipelines.db import on_commit
from pipelines.models import Job
from worker.dispatch import relay_webhooks, revoke

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
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if state:
        query = query.where(Job.state == state)
    rows, next_cursor = newest_first_page(session, query, Job.created_at, Job.id, cursor, limit)
    return ok(request, {"jobs": [JobOut.of(j) for j in rows]}, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Envelope[JobOut])
def get_job(job_id: str, request: Request, session: SessionDep, _key: ReadKey) -> dict:
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, f"no job '{job_id}'")
    return ok(request, JobOut.of(job))


def cancel_job(session, job_id: str, request_id: str | None) -> str:
    """Cancel JOB_ID in SESSION's transaction; the message is revoked once that commits."""
    try:
        outcome = jobs.cancel(session, job_id)
    except jobs.NotCancellable as exc:
        raise ApiError(409, str(exc)) from None
    if outcome is None:
        raise ApiError(404, f"no job '{job_id}'")
    state, task_id = outcome
    if task_id:
        on_commit(session, lambda: revoke(task_id))
    if state == "cancelled":  # ended here: its job.cancelled event is ready to go
        on_commit(session, relay_webhooks)
    journal.record(session, "job.cancel_requested", f"cancellation of {job_id} requested; now {state}",
                   job_id=job_id, details={"request_id": request_id})
    return state


@router.post("/{job_id}/cancel", status_code=202, response_model=Envelope[JobOut])
def cancel(job_id: str, request: Request, session: SessionDep, _key: WriteKey) -> dict:
    """Cancel a job: a queued job at once, a running one at its next batch boundary (committed
    batches stay). Cancelling a job that has ended is 409."""
    state = cancel_job(session, job_id, request.state.request_id)
    session.commit()
    job = session.get(Job, job_id)
    return ok(request, JobOut.of(job), message=f"job {state}")
