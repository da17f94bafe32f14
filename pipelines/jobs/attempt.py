"""One attempt at a job: claim it, do its work with a heartbeat, record how it ended.

Every write goes through `pipelines.jobs.machine`, guarded by the attempt's lease: an attempt that
lost the job (cancelled, timed out, taken over) can no longer write on its behalf.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from sqlalchemy import ColumnElement, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError

from pipelines.core.db import autocommit, driver, get_engine
from pipelines.core.loops import ProcessThread
from pipelines.core.models import JobState
from pipelines.core.settings import get_settings
from pipelines.jobs import machine

log = logging.getLogger(__name__)


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
    # What the claim read beside the job, when the work asked for it (`execute`'s SUBJECT).
    subject: Any = None
    # Writes that belong with success (a scenario run's outputs): made by the statement that records it.
    final_writes: machine.SuccessWrites | None = None
    # Records counted at the end rather than batch by batch (work too small to report progress).
    processed: int = 0
    # The connection the attempt was claimed on, while its work runs (autocommit): for its reads.
    connection: Connection | None = None

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads, each statement its own transaction: the attempt's own while it has
        one (no second checkout and ping), else one from the pool."""
        if self.connection is not None:
            yield self.connection
        else:
            with autocommit() as connection:
                yield connection

    @contextmanager
    def batch(self, *, processed: int, failed: int, checkpoint: dict, progress: int | None) -> Iterator[Any]:
        """A transaction for one batch: the caller's writes and the job's progress commit together.

        Yields the psycopg connection. If this attempt no longer holds the job, nothing commits.
        """
        with get_engine().begin() as connection:
            # Safe: the batch and its checkpoint commit atomically, so a lost commit loses both.
            connection.execute(text("SET LOCAL synchronous_commit = off"))
            yield driver(connection)
            if not machine.progress(connection, self.id, self.lease, processed=processed, failed=failed,
                                    checkpoint=checkpoint, percent=progress):
                raise JobStopped(self.id)
        self.checkpoint = checkpoint

    def restart(self) -> None:
        """Forget what earlier attempts counted: for work that always starts over (exports)."""
        with get_engine().begin() as connection:
            if not machine.restart(connection, self.id, self.lease):
                raise JobStopped(self.id)


def claim(job_id: str, owner: str, connection: Connection | None = None,
          subject: ColumnElement | None = None) -> JobRun | None:
    """Take JOB_ID for a new attempt, reading SUBJECT with it (see `machine.claim`)."""
    taken = machine.claim(job_id, owner, connection, subject)
    if taken is None:
        return None
    return JobRun(job_id, taken.kind, taken.lease, taken.params, taken.checkpoint, taken.attempts, taken.result,
                  subject=taken.subject)


def finish(run: JobRun, state: JobState, *, result: dict | None = None, error: str | None = None) -> bool:
    """End RUN's job in STATE if this attempt still holds it (a cancelling job can only be cancelled).

    A success also makes RUN's `final_writes`, in the same statement: both commit, or neither. The
    statement runs on the connection the attempt was claimed on, in autocommit (no second checkout or
    check, no BEGIN and COMMIT around it); if that connection has died meanwhile (the database
    restarted) or the work left it unusable, on a fresh one from the pool. Trying again is safe: the end
    is guarded by the lease, so a first try that did commit makes the second a no-op."""
    def end(connection: Connection) -> Any:
        return machine.end(connection, run.id, run.lease, state, result=result or {}, error=error,
                           processed=run.processed, writes=run.final_writes if state == JobState.SUCCEEDED else None)

    own = run.connection
    if own is not None and not own.invalidated:
        try:
            ended = end(own)
        except (psycopg.Error, DBAPIError):  # dropped, or left mid-statement by the work
            own.invalidate()  # not given back to the pool as it is
        else:
            return _logged(run, ended, error)
    with autocommit() as connection:
        ended = end(connection)
    return _logged(run, ended, error)


def _logged(run: JobRun, ended: Any, error: str | None) -> bool:
    """Whether the attempt ended its job (ENDED: the row as it ended, or None), logged once committed."""
    if ended is not None:
        machine.log_end(run.kind, run.id, ended, error)
    return ended is not None


class Heartbeats(ProcessThread):
    """Tells the reaper the attempts of this process are alive, every few seconds: one thread per
    process for all of them (started with the first), so an attempt costs no thread of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, str] = {}  # job id -> lease

    def add(self, run: JobRun) -> None:
        self.runs[run.id] = run.lease

    def discard(self, run: JobRun) -> None:
        self.runs.pop(run.id, None)

    def run(self) -> None:
        interval = get_settings().heartbeat_seconds
        while True:
            time.sleep(interval)
            for job_id, lease in list(self.runs.items()):
                try:
                    with autocommit() as connection:
                        machine.beat(connection, job_id, lease)
                except Exception:  # a missed beat is harmless; the next one may get through
                    log.warning("heartbeat for %s failed", job_id, exc_info=True)


def _internal(exc: Exception, job_id: str) -> str:
    """What a job's caller is told of an error nobody planned for: its kind, never its text (which may
    hold SQL, paths or values); the worker's log has the whole of it."""
    return f"internal error ({type(exc).__name__}); the worker's log has the details of job {job_id}"


def execute(job_id: str, work: Callable[[JobRun], dict], owner: str | None = None,
            subject: ColumnElement | None = None) -> Outcome:
    """Run one attempt of JOB_ID: claim it (reading SUBJECT with it, for WORK's `JobRun.subject`), do
    WORK with a heartbeat, and record how it ended."""
    with autocommit() as connection:
        run = claim(job_id, owner or machine.owner_name(), connection, subject)
        if run is None:
            return Outcome.SKIPPED
        run.connection = connection
        try:
            return _attempt(run, work)
        finally:
            run.connection = None


def _attempt(run: JobRun, work: Callable[[JobRun], dict]) -> Outcome:
    job_id = run.id
    # Every log line of this attempt names the job (and the request that started it, via the job).
    structlog.contextvars.bind_contextvars(job_id=job_id, job_kind=run.kind)
    log.info("%s %s started (attempt %s)", run.kind, job_id, run.attempts)
    heartbeats = Heartbeats.of_this_process()
    heartbeats.add(run)
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
        heartbeats.discard(run)
        structlog.contextvars.unbind_contextvars("job_id", "job_kind")
    try:
        finish(run, JobState.SUCCEEDED, result=result)
    except Exception as exc:  # its final writes failed: nothing of the success committed
        log.exception("job %s could not record its success", job_id)
        run.final_writes = None
        try:
            finish(run, JobState.FAILED, result=result, error=_internal(exc, job_id))
        except (psycopg.DataError, DataError):  # the result itself may be what PostgreSQL refused: end without it
            log.exception("job %s: its failure is recorded without the result it could not store", job_id)
            finish(run, JobState.FAILED, result=run.result if run.result is not result else {},
                   error=_internal(exc, job_id))
        return Outcome.FAILED
    return Outcome.SUCCEEDED
