"""Jobs: one model for every kind of background work, and its state machine, guarded in SQL.

Every transition is an UPDATE whose WHERE names the states it may leave and, once running, the lease
of the attempt that holds the job, so a duplicate or late message can never move a job backwards or
write on behalf of an attempt that lost it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil
import structlog
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipelines.core.db import driver, get_engine, on_commit, session_scope
from pipelines.core.models import Job, JobState
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)

Sender = Callable[[Job], None]


class Outcome(enum.StrEnum):
    """How one attempt at a job ended, as `execute` reports it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # cancelled or taken over while it ran
    SKIPPED = "skipped"  # another attempt holds the job, or it has ended


class JobStopped(Exception):
    """The attempt no longer holds the job: it was cancelled, timed out, or taken over."""


class JobFailed(Exception):
    """The work cannot succeed; the message becomes the job's error."""


def create_job(
    session: Session,
    *,
    kind: str,
    queue: str,
    params: dict[str, Any],
    send: Sender,
    sources: list[str] | None = None,
    request_id: str | None = None,
    api_key_id: str | None = None,
    timeout_seconds: int | None = None,
) -> Job:
    """Record a queued job in SESSION's transaction; its message goes out only once that commits."""
    job = Job(
        kind=kind,
        queue=queue,
        params=params,
        sources=sources or [],
        request_id=request_id,
        api_key_id=api_key_id,
        timeout_seconds=timeout_seconds or get_settings().job_timeout_seconds,
        state=JobState.QUEUED,
        progress=0,
        records_processed=0,
        records_failed=0,
        attempts=0,
        result={},
        checkpoint={},
        celery_task_id=str(uuid.uuid4()),
        sent_at=datetime.now(UTC),
    )
    session.add(job)
    session.flush()
    snapshot = Job(id=job.id, kind=job.kind, queue=job.queue, celery_task_id=job.celery_task_id)
    on_commit(session, lambda: send(snapshot))
    return job


class NotCancellable(Exception):
    """The job has already ended."""


def cancel(session: Session, job_id: str) -> tuple[str, str | None] | None:
    """Cancel JOB_ID: a queued job at once, a running one at its next batch boundary.

    Returns (new state, the message id to revoke) or None if there is no such job; raises
    NotCancellable for a job that has ended. Work already committed stays committed.
    """
    row = session.execute(
        text(
            "UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE 'cancelling' END, "
            "finished_at = CASE WHEN state = 'queued' THEN now() END "
            "WHERE id = :id AND state IN ('queued', 'running', 'cancelling') RETURNING state, celery_task_id"
        ),
        {"id": job_id},
    ).one_or_none()
    if row is not None:
        return row.state, row.celery_task_id if row.state == "cancelled" else None
    state = session.scalar(select(Job.state).where(Job.id == job_id))
    if state is None:
        return None
    raise NotCancellable(f"job {job_id} has already {state}")


# --- one attempt at a job -------------------------------------------------------------------------


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_owner(owner: str | None) -> str | None:
    """OWNER if it names a process on this host that no longer exists (a killed pool process)."""
    if not owner or ":" not in owner:
        return None
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid)):
        return owner
    return None


@dataclass
class JobRun:
    """What an attempt knows of the job it holds, and the one way it writes progress."""

    id: str
    kind: str
    lease: str
    params: dict[str, Any]
    checkpoint: dict[str, Any]
    attempts: int
    result: dict[str, Any] = field(default_factory=dict)
    # Writes that belong with success (a scenario run's outputs): made in the transaction that records it.
    final_writes: Callable[[Any], None] | None = None

    @contextmanager
    def batch(self, *, processed: int, failed: int, checkpoint: dict, progress: int | None) -> Iterator[Any]:
        """A transaction for one batch: the caller's writes and the job's progress commit together.

        Yields the psycopg connection. If this attempt no longer holds the job, nothing commits.
        """
        with get_engine().begin() as connection:
            # Safe: the batch and its checkpoint commit atomically, so a lost commit loses both.
            connection.execute(text("SET LOCAL synchronous_commit = off"))
            yield driver(connection)
            updated = connection.execute(
                text(
                    "UPDATE jobs SET records_processed = records_processed + :p, "
                    "records_failed = records_failed + :f, checkpoint = CAST(:c AS jsonb), "
                    "progress = GREATEST(progress, COALESCE(:g, progress)), heartbeat_at = now() "
                    "WHERE id = :id AND lease_id = :lease AND state = 'running'"
                ),
                {
                    "p": processed,
                    "f": failed,
                    "c": json.dumps(checkpoint),
                    "g": progress,
                    "id": self.id,
                    "lease": self.lease,
                },
            ).rowcount
            if not updated:
                raise JobStopped(self.id)
        self.checkpoint = checkpoint

    def restart(self) -> None:
        """Forget what earlier attempts counted: for work that always starts over (exports)."""
        with get_engine().begin() as connection:
            updated = connection.execute(
                text("UPDATE jobs SET records_processed = 0, records_failed = 0, progress = 0, checkpoint = '{}' "
                     "WHERE id = :id AND lease_id = :lease AND state = 'running'"),
                {"id": self.id, "lease": self.lease},
            ).rowcount
        if not updated:
            raise JobStopped(self.id)


def claim(job_id: str, owner: str) -> JobRun | None:
    """Take JOB_ID for a new attempt, or None if another live attempt holds it or it has ended."""
    settings = get_settings()
    lease = uuid.uuid4().hex
    with session_scope() as session:
        current = session.get(Job, job_id)
        if current is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        row = session.execute(
            text(
                "UPDATE jobs SET state = 'running', lease_id = :lease, lease_owner = :owner, "
                "heartbeat_at = now(), started_at = COALESCE(started_at, now()), attempts = attempts + 1 "
                "WHERE id = :id AND (state = 'queued' OR (state = 'running' AND "
                "(heartbeat_at < now() - make_interval(secs => :stale) OR lease_owner = :dead))) "
                "RETURNING kind, params, checkpoint, attempts, result"
            ),
            {
                "lease": lease,
                "owner": owner,
                "id": job_id,
                "stale": settings.heartbeat_stale_seconds,
                "dead": _dead_owner(current.lease_owner),
            },
        ).one_or_none()
        if row is None:
            return None
        if row.attempts > settings.max_job_attempts:
            session.execute(
                text(
                    "UPDATE jobs SET state = 'failed', finished_at = now(), lease_id = NULL, error = :error "
                    "WHERE id = :id AND lease_id = :lease"
                ),
                {
                    "id": job_id,
                    "lease": lease,
                    "error": f"gave up after {row.attempts - 1} attempts: the worker running this job "
                    "was lost each time",
                },
            )
            return None
    return JobRun(job_id, row.kind, lease, row.params, row.checkpoint, row.attempts, dict(row.result or {}))


def finish(run: JobRun, state: JobState, *, result: dict | None = None, error: str | None = None) -> bool:
    """End RUN's job in STATE if this attempt still holds it (a cancelling job can only be cancelled).

    A success also makes RUN's `final_writes`, in the same transaction: both commit, or neither."""
    with get_engine().begin() as connection:
        ended = connection.execute(
            text(
                "UPDATE jobs SET state = CASE WHEN state = 'cancelling' THEN 'cancelled' ELSE :state END, "
                "finished_at = now(), lease_id = NULL, result = CAST(:result AS jsonb), error = :error, "
                "progress = CASE WHEN :state = 'succeeded' THEN 100 ELSE progress END "
                "WHERE id = :id AND lease_id = :lease AND state IN ('running', 'cancelling') "
                "RETURNING state, records_processed, records_failed, finished_at - started_at AS took"
            ),
            {"state": str(state), "result": json.dumps(result or {}), "error": error, "id": run.id, "lease": run.lease},
        ).one_or_none()
        if ended is not None and ended.state == JobState.SUCCEEDED and run.final_writes is not None:
            run.final_writes(driver(connection))
    if ended is not None:  # what a person watching the console wants to see of each job
        took = ended.took.total_seconds() if ended.took else 0.0
        log.info("%s %s %s in %.1f s: %s records, %s quarantined%s", run.kind, run.id, ended.state, took,
                 ended.records_processed, ended.records_failed, f"; {error}" if error else "")
    return ended is not None


class Heartbeat(threading.Thread):
    """Tells the reaper this attempt is alive, every few seconds, until stopped."""

    def __init__(self, run: JobRun):
        super().__init__(name=f"heartbeat-{run.id}", daemon=True)
        self.run_ = run
        self.halt = threading.Event()

    def run(self) -> None:
        interval = get_settings().heartbeat_seconds
        while not self.halt.wait(interval):
            try:
                with get_engine().begin() as connection:
                    connection.execute(
                        text("UPDATE jobs SET heartbeat_at = now() WHERE id = :id AND lease_id = :lease"),
                        {"id": self.run_.id, "lease": self.run_.lease},
                    )
            except Exception:  # a missed beat is harmless; the next one may get through
                log.warning("heartbeat for %s failed", self.run_.id, exc_info=True)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)


def _internal(exc: Exception, job_id: str) -> str:
    """What a job's caller is told of an error nobody planned for: its kind, never its text (which may
    hold SQL, paths or values); the worker's log has the whole of it."""
    return f"internal error ({type(exc).__name__}); the worker's log has the details of job {job_id}"


def execute(job_id: str, work: Callable[[JobRun], dict], owner: str | None = None) -> Outcome:
    """Run one attempt of JOB_ID: claim it, do WORK with a heartbeat, and record how it ended."""
    run = claim(job_id, owner or owner_name())
    if run is None:
        return Outcome.SKIPPED
    # Every log line of this attempt names the job (and the request that started it, via the job).
    structlog.contextvars.bind_contextvars(job_id=job_id, job_kind=run.kind)
    log.info("%s %s started (attempt %s)", run.kind, job_id, run.attempts)
    heartbeat = Heartbeat(run)
    heartbeat.start()
    try:
        result = work(run)
    except JobStopped:
        # Cancelled or taken over: finish() only acts if this attempt still holds the lease.
        finish(run, JobState.CANCELLED, result=run.result)
        return Outcome.STOPPED
    except JobFailed as exc:
        finish(run, JobState.FAILED, result=run.result, error=str(exc))
        return Outcome.FAILED
    except Exception as exc:
        log.exception("job %s failed", job_id)
        finish(run, JobState.FAILED, result=run.result, error=_internal(exc, job_id))
        return Outcome.FAILED
    finally:
        heartbeat.stop()
        structlog.contextvars.unbind_contextvars("job_id", "job_kind")
    try:
        finish(run, JobState.SUCCEEDED, result=result)
    except Exception as exc:  # its final writes failed: nothing of the success committed
        log.exception("job %s could not record its success", job_id)
        run.final_writes = None
        finish(run, JobState.FAILED, result=result, error=_internal(exc, job_id))
        return Outcome.FAILED
    return Outcome.SUCCEEDED
