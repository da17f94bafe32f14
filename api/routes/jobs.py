"""Jobs: one model for every kind of background work."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api import watch
from api.deps import Reader, SessionDep, Writer
from api.envelope import Cursor, Envelope, found, ok
from api.schemas import JobList, JobOut
from pipelines.core.models import Job, JobKind, JobState
from pipelines.jobs import control, listing
from worker.dispatch import relay_webhooks, revoke

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=Envelope[JobList])
def list_jobs(
    request: Request,
    session: SessionDep,
    caller: Reader,
    kind: JobKind | None = None,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Cursor = None,
) -> dict:
    """Jobs newest first; exports only the caller's own (an admin's: every one)."""
    rows, next_cursor = listing.page(session, kind=kind, state=state, cursor=cursor, limit=limit,
                                     owner=caller.owner)
    return ok(request, {"jobs": [JobOut.of(j) for j in rows]}, next_cursor=next_cursor)


@router.get("/{job_id}", response_model=Envelope[JobOut])
async def get_job(job_id: str, request: Request, caller: Reader) -> dict:
    job = await listing.fetch_job(job_id, caller.owner)
    return ok(request, JobOut.model_validate(found(job, f"no job '{job_id}'")))


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`job` events (the job's state, progress and counts) as it changes, "
                                            "then `end`; the stream closes when the job has ended"}})
async def job_events(job_id: str, caller: Reader) -> StreamingResponse:
    """Watch a job without polling: server-sent events until it ends. Every open stream is served by
    the API process's one reader (`api/watch.py`), not by a database connection of its own."""
    job = found(await listing.fetch_job(job_id, caller.owner), f"no job '{job_id}'")
    return StreamingResponse(watch.event_stream(job, caller),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _job(session, job_id: str) -> Job:
    return found(listing.get(session, job_id), f"no job '{job_id}'")


@router.post("/{job_id}/cancel", status_code=202, response_model=Envelope[JobOut])
def cancel(job_id: str, request: Request, session: SessionDep, caller: Writer) -> dict:
    """Cancel a job: a queued job at once, a running one at its next batch boundary (committed
    batches stay). Cancelling a job that has ended is 409."""
    state = control.request_cancel(session, job_id, request.state.request_id, revoke=revoke,
                                   relay=relay_webhooks, owner=caller.owner)
    return ok(request, JobOut.of(_job(session, job_id)), message=f"job {state}")
