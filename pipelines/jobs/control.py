"""What callers ask of jobs: start an ingestion (its sources free), cancel a job, stop ingestions.

Each runs in the caller's transaction; the messages it implies (the task to send, the one to revoke,
the webhook relay to wake) go out only once that transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipelines.core.db import on_commit
from pipelines.core.errors import Conflict, NotFound
from pipelines.core.models import ACTIVE_STATES, Job, JobKind, JobState
from pipelines.jobs import journal, listing
from pipelines.jobs.machine import NotCancellable, Sender, cancel, create_job

# Advisory lock held while a job that claims sources is checked and created.
SOURCES_LOCK = 7160002

__all__ = ["NotCancellable", "SourcesBusy", "NoSuchJob", "start_ingestion", "request_cancel", "stop_ingestion",
           "active_sources"]


class NoSuchJob(NotFound):
    def __init__(self, job_id: str | None, what: str = "job"):
        super().__init__(f"no {what} '{job_id}'")


def lock_sources(session: Session) -> None:
    """Serialise the check-then-create of jobs that claim sources (held to the end of the transaction)."""
    session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": SOURCES_LOCK})


def active_sources(session: Session, among: list[str] | None = None) -> set[str]:
    """The sources named by an ingestion job that is queued, running or cancelling (of AMONG only,
    when given)."""
    query = select(Job.sources).where(Job.kind == JobKind.INGESTION, Job.state.in_(ACTIVE_STATES))
    if among is not None:
        query = query.where(Job.sources.overlap(among))
    active = {s for row in session.scalars(query) for s in row}
    return active if among is None else active & set(among)


class SourcesBusy(Conflict):
    def __init__(self, sources: list[str]):
        super().__init__(f"source(s) already have an ingestion job queued or running: {', '.join(sources)}",
                         {"sources": sources})
        self.sources = sources


def start_ingestion(session: Session, sources: list[str], options: dict, send: Sender, **job_fields) -> Job:
    """Queue one ingestion job for SOURCES unless one of them is already queued or running."""
    lock_sources(session)
    busy = active_sources(session, among=sources)
    if busy:
        raise SourcesBusy(sorted(busy))
    return create_job(session, kind=JobKind.INGESTION, params={"sources": sources, "options": options},
                      sources=sources, send=send, **job_fields)


def request_cancel(session: Session, job_id: str, request_id: str | None, *, revoke: Callable[[str], None],
                   relay: Callable[[], object], owner: str | None = None) -> str:
    """Cancel JOB_ID in SESSION's transaction; once it commits, its message is revoked and, if it ended
    here, its job.cancelled event relayed. Returns the new state; NoSuchJob (also for another's export
    when OWNER is given), NotCancellable."""
    if owner is not None and listing.get(session, job_id, owner=owner) is None:
        raise NoSuchJob(job_id)
    outcome = cancel(session, job_id)
    if outcome is None:
        raise NoSuchJob(job_id)
    state, task_id = outcome
    if task_id:
        on_commit(session, lambda: revoke(task_id))
    if state == JobState.CANCELLED:
        on_commit(session, relay)
    journal.record(session, "job.cancel_requested", f"cancellation of {job_id} requested; now {state}",
                   job_id=job_id, details={"request_id": request_id})
    return state


def stop_ingestion(session: Session, job_id: str | None, request_id: str | None, *,
                   revoke: Callable[[str], None], relay: Callable[[], object]) -> list[str]:
    """Cancel one ingestion job, or every queued and running one when JOB_ID is None; the ids.
    NoSuchJob if JOB_ID is not an ingestion job."""
    if job_id:
        if session.scalar(select(Job.kind).where(Job.id == job_id)) != JobKind.INGESTION:
            raise NoSuchJob(job_id, "ingestion job")
        targets = [job_id]
    else:
        targets = list(session.scalars(select(Job.id).where(
            Job.kind == JobKind.INGESTION, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))))
    for target in targets:
        request_cancel(session, target, request_id, revoke=revoke, relay=relay)
    return targets
