"""Jobs: the one owner of a job's state and of its message's bookkeeping.

`ALLOWED` is the state machine. Every change of a job's state is one UPDATE built by `_moving`, whose
WHERE names only the states the table lets it leave (and, once running, the lease of the attempt
that holds the job), so a duplicate or late message, a second reaper or a racing cancel can never
move a job where the table says it may not go. Nothing outside this module writes `jobs.state`.

A job's message is counted per kind in a sequence (`send_seq`): the reaper compares how many
messages were sent with how many still wait in the broker to tell which ones were taken but never
started (`pipelines.jobs.reaper`).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from psycopg import sql as psql
from sqlalchemy import (
    ColumnElement,
    Insert,
    Update,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from pipelines.core.db import Prepared, autocommit, on_commit
from pipelines.core.errors import Conflict
from pipelines.core.models import Job, JobKind, JobState, new_id
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)

Q, R, S, F, CG, C = (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED,
                     JobState.CANCELLING, JobState.CANCELLED)

# Where each state may go. running -> running is an attempt taking over from one that died; failed or
# cancelled -> queued is an admin's re-run. Succeeded is final: a run's outputs are written once.
ALLOWED: dict[JobState, frozenset[JobState]] = {
    Q: frozenset({R, C, F}),
    R: frozenset({R, S, F, CG, C, Q}),
    CG: frozenset({C}),
    S: frozenset(),
    F: frozenset({Q}),
    C: frozenset({Q}),
}

# The message counter of each kind: a sequence per kind, so a kind's messages can be counted.
SEND_SEQUENCES = {kind: f"job_send_seq_{kind.value}" for kind in JobKind}


@dataclass(frozen=True)
class Message:
    """What a job's message carries, for whoever sends it (the worker's dispatch)."""

    id: str
    kind: str
    task_id: str
    about: str = ""  # in words, for people watching the broker (Flower): the sources, scenario or format


def described(sources: list[str] | None, params: dict | None) -> str:
    """What a job is about, in a few words: its sources, else its scenario or its export's format."""
    params = params or {}
    return ", ".join(sources or ()) or str(params.get("scenario_id") or params.get("format") or "")


Sender = Callable[[Message], None]


class InvalidTransition(ValueError):
    pass


class NotCancellable(Conflict):
    """The job has already ended."""


def _moving(moves: Mapping[JobState, JobState], *where: Any, **values: Any) -> Update:
    """UPDATE jobs moving each state in MOVES to its target, guarded to just those states (and WHERE).

    Raises InvalidTransition for a move the table does not allow: every statement below is built
    when this module is imported, so a wrong one cannot even load."""
    for source, target in moves.items():
        if target not in ALLOWED[source]:
            raise InvalidTransition(f"a job cannot go from {source} to {target}")
    targets = set(moves.values())
    state = literal(targets.pop().value) if len(targets) == 1 else case(
        {source.value: target.value for source, target in moves.items()}, value=Job.state)
    # Each state a parameter of its own (an expanding list is rewritten into the SQL at every execution).
    return update(Job).where(Job.state.in_([literal(s.value) for s in moves]), *where).values(state=state, **values)


def _next_send(kind: Any) -> Any:
    """The next number of KIND's message counter (KIND a kind, or the row's own kind column)."""
    if isinstance(kind, str):
        return func.nextval(SEND_SEQUENCES[JobKind(kind)])
    return case({k.value: func.nextval(name) for k, name in SEND_SEQUENCES.items()}, value=kind)


_NEW_MESSAGE = {"celery_task_id": func.gen_random_uuid().cast(Job.celery_task_id.type),
                "send_seq": _next_send(Job.kind), "sent_at": func.now()}
_SENT = (Job.id, Job.kind, Job.celery_task_id, Job.sources, Job.params)


def _send_after_commit(session: Session, send: Sender, rows: Any) -> list[str]:
    messages = [Message(row.id, row.kind, row.celery_task_id, described(row.sources, row.params)) for row in rows]

    def send_all() -> None:
        for message in messages:
            send(message)

    if messages:
        on_commit(session, send_all)
    return [m.id for m in messages]


def transition(session: Session, job_id: str, to: JobState, **values: Any) -> bool:
    """Move JOB_ID to TO from any state the table allows; False if it is in none of them. (The
    specific transitions below say what else changes; this one is the table itself, for the test
    that proves every other move refused.)"""
    sources = {state: to for state in JobState if to in ALLOWED[state]}
    if not sources:
        return False
    return bool(session.execute(_moving(sources, Job.id == job_id, **values).returning(Job.id)).first())


# --- queued: created, cancelled, re-run, re-sent ----------------------------------------------------


def _first_values(kind: JobKind, params: dict[str, Any], *, sources: list[str] | None = None,
                  request_id: str | None = None, api_key_id: str | None = None,
                  timeout_seconds: int | None = None) -> dict[str, Any]:
    """What a new job's row holds, whoever writes it, but for its place among its kind's messages
    (`sent_at`, `send_seq`), which each writer takes in its own statement."""
    return {"id": new_id("job"), "kind": kind, "state": Q, "params": params, "sources": sources or [],
            "request_id": request_id, "api_key_id": api_key_id,
            "timeout_seconds": timeout_seconds or get_settings().job_timeout_seconds, "progress": 0,
            "records_processed": 0, "records_failed": 0, "attempts": 0, "result": {}, "checkpoint": {},
            "celery_task_id": str(uuid.uuid4())}


def create_job(session: Session, *, kind: JobKind, params: dict[str, Any], send: Sender,
               sources: list[str] | None = None, request_id: str | None = None, api_key_id: str | None = None,
               timeout_seconds: int | None = None) -> Job:
    """Record a queued job in SESSION's transaction; its message goes out only once that commits. The
    kind decides the task and the queue (`worker.queues`)."""
    first = _first_values(kind, params, sources=sources, request_id=request_id, api_key_id=api_key_id,
                          timeout_seconds=timeout_seconds)
    job = session.scalars(insert(Job).values(**first, sent_at=func.now(), send_seq=_next_send(kind))
                          .returning(Job)).one()
    message = Message(job.id, job.kind, job.celery_task_id, described(job.sources, job.params))  # type: ignore[arg-type]
    on_commit(session, lambda: send(message))
    return job


# The same new row, written on the API's event loop (pipelines.core.adb) in one statement that also
# share-locks the object the job is about (a delete, which locks it exclusively, waits; starts of the
# same object do not wait for each other), and answers with the job as `pipelines.jobs.listing` shows it.
_FIRST_COLUMNS = ("id", "kind", "state", "params", "sources", "request_id", "api_key_id", "timeout_seconds",
                  "progress", "records_processed", "records_failed", "attempts", "result", "checkpoint",
                  "celery_task_id")
_CREATE_NOW = psql.SQL(
    "WITH about AS (SELECT FROM {table} WHERE id = %(about)s FOR KEY SHARE) "
    "INSERT INTO jobs ({columns}, sent_at, send_seq) "
    "SELECT {values}, now(), nextval(%(sequence)s::regclass) FROM about "
    "RETURNING id, kind, state, progress, records_processed, records_failed, params, result, error, created_at, "
    "started_at, finished_at, request_id, celery_task_id, attempts, sources")
_LOCKABLE = {"scenarios": _CREATE_NOW.format(
    table=psql.Identifier("scenarios"), columns=psql.SQL(", ").join(map(psql.Identifier, _FIRST_COLUMNS)),
    # Cast to the columns' own types, so that the SELECT's outputs are what they take (an empty list
    # is no array by itself).
    values=psql.SQL(", ").join(
        psql.SQL("{}::{}").format(psql.Placeholder(column),
                                  psql.SQL(Job.__table__.c[column].type.compile(dialect=postgresql.dialect())))
        for column in _FIRST_COLUMNS)).as_string()}  # composed once: not again at every start


async def create_job_now(*, kind: JobKind, params: dict[str, Any], send: Sender, about: tuple[str, str],
                         request_id: str | None = None, api_key_id: str | None = None) -> dict[str, Any] | None:
    """`create_job` in one statement of its own on the event loop, for a job about ABOUT (a table and
    an id): None if there is no such row. Its message goes out once the statement has committed."""
    from psycopg.types.json import Jsonb

    from pipelines.core import adb

    table, about_id = about
    first = _first_values(kind, params, request_id=request_id, api_key_id=api_key_id)
    assert tuple(first) == _FIRST_COLUMNS
    values = {column: Jsonb(value) if isinstance(value, dict) else getattr(value, "value", value)
              for column, value in first.items()}
    row = await adb.write(_LOCKABLE[table], {**values, "about": about_id, "sequence": SEND_SEQUENCES[kind]})
    if row is not None:
        send(Message(row["id"], row["kind"], row["celery_task_id"], described(row["sources"], row["params"])))
    return row


_CANCEL = _moving({Q: C, R: CG}, Job.id == bindparam("job"),
                  finished_at=case((Job.state == Q, func.now()))).returning(Job.state, Job.celery_task_id)


def cancel(session: Session, job_id: str) -> tuple[str, str | None] | None:
    """Cancel JOB_ID: a queued job at once, a running one at its next batch boundary.

    Returns (new state, the message id to revoke) or None if there is no such job; raises
    NotCancellable for a job that has ended. Work already committed stays committed.
    """
    row = session.execute(_CANCEL, {"job": job_id}).one_or_none()
    if row is not None:
        return row.state, row.celery_task_id if row.state == C else None
    state = session.scalar(select(Job.state).where(Job.id == job_id))
    if state is None:
        return None
    if state == CG:
        return state, None
    raise NotCancellable(f"job {job_id} has already {state}")


_FAIL = _moving({Q: F, R: F}, Job.id == bindparam("job"), error=bindparam("error"), finished_at=func.now(),
                lease_id=None).returning(Job.id)
_RERUN = _moving({F: Q, C: Q}, Job.id == bindparam("job"), error=None, finished_at=None, started_at=None,
                 lease_id=None, attempts=0, progress=0, result={}, checkpoint={}, **_NEW_MESSAGE).returning(*_SENT)


def fail(session: Session, job_id: str, reason: str) -> bool:
    """An admin marks a queued or running job failed with REASON; False from any other state."""
    return session.execute(_FAIL, {"job": job_id, "error": reason}).first() is not None


def rerun(session: Session, job_id: str, send: Sender) -> bool:
    """Queue a failed or cancelled job again, as new (its message goes after the commit); False from
    any other state."""
    return bool(_send_after_commit(session, send, session.execute(_RERUN, {"job": job_id})))


_RESEND = update(Job).where(Job.id.in_(
    select(Job.id).where(Job.state == Q, Job.kind == bindparam("of_kind"), Job.send_seq <= bindparam("upto"))
    .order_by(Job.send_seq).limit(bindparam("most")).with_for_update(skip_locked=True).scalar_subquery()),
    Job.state == Q).values(**_NEW_MESSAGE).returning(*_SENT)


def resend_taken(session: Session, kind: str, upto: int, most: int, send: Sender) -> list[str]:
    """Send again (after the commit) up to MOST queued jobs of KIND whose message was counted at or
    below UPTO: messages the broker has handed out, or lost, without their job ever starting."""
    return _send_after_commit(session, send, session.execute(_RESEND, {"of_kind": kind, "upto": upto, "most": most}))


_COUNTED = text("SELECT sequencename, COALESCE(last_value, 0) FROM pg_sequences WHERE sequencename IN :names"
                ).bindparams(bindparam("names", expanding=True))
_KIND_OF_SEQUENCE = {name: kind.value for kind, name in SEND_SEQUENCES.items()}


def messages_sent(connection: Connection) -> dict[str, int]:
    """How many messages each kind has counted (sent, or about to be sent)."""
    rows = connection.execute(_COUNTED, {"names": list(_KIND_OF_SEQUENCE)})
    return {_KIND_OF_SEQUENCE[name]: int(last) for name, last in rows}


# --- running: claimed, taken over, progress, ended --------------------------------------------------


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


# The attempt holding the job (its lease), and a heartbeat gone quiet: said once, used by each statement.
_HELD = (Job.id == bindparam("job"), Job.lease_id == bindparam("lease"))
_STALE = Job.heartbeat_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("stale"))
_CLAIMED = dict(lease_id=bindparam("lease"), lease_owner=bindparam("owner"), heartbeat_at=func.now(),
                started_at=func.coalesce(Job.started_at, func.now()), attempts=Job.attempts + 1)
_CLAIM_RETURNS = (Job.kind, Job.params, Job.checkpoint, Job.attempts, Job.result)
_CLAIM = _moving({Q: R}, Job.id == bindparam("job"), **_CLAIMED).returning(*_CLAIM_RETURNS)
_TAKE_OVER = _moving({R: R}, Job.id == bindparam("job"), _STALE | (Job.lease_owner == bindparam("dead")),
                     **_CLAIMED).returning(*_CLAIM_RETURNS)
_GIVE_UP = _moving({R: F}, *_HELD, finished_at=func.now(), lease_id=None, error=bindparam("error"))


@dataclass
class Claim:
    lease: str
    kind: str
    params: dict[str, Any]
    checkpoint: dict[str, Any]
    attempts: int
    result: dict[str, Any]
    subject: Any = None  # what the claim read beside the job, if it was asked to (see `claim`)


@functools.cache
def _claiming(subject: ColumnElement | None) -> tuple[Prepared, Update]:
    """The claim (prepared: every job runs it) and the take-over, returning SUBJECT as well when there
    is one."""
    if subject is None:
        return Prepared(_CLAIM), _TAKE_OVER
    return Prepared(_CLAIM.returning(subject.label("subject"))), _TAKE_OVER.returning(subject.label("subject"))


def claim(job_id: str, owner: str, connection: Connection | None = None,
          subject: ColumnElement | None = None) -> Claim | None:
    """Take JOB_ID for a new attempt, or None if another live attempt holds it or it has ended.

    A queued job is taken in one statement; only when that finds nothing is the job looked at, to
    take over from an attempt whose heartbeat stopped or whose process is gone. Each statement is
    guarded on its own, so none needs a transaction around it. SUBJECT, an expression over the job's
    row (a scalar subquery), is read by the statement that takes it: what the work needs first, in the
    same round trip (a scenario run's scenario)."""
    if connection is None:
        with autocommit() as connection:
            return claim(job_id, owner, connection, subject)
    settings = get_settings()
    lease = uuid.uuid4().hex
    take, take_over = _claiming(subject)
    row: Any = take.execute(connection, {"job": job_id, "lease": lease, "owner": owner}).fetchone()
    if row is None:
        current = connection.execute(select(Job.lease_owner).where(Job.id == job_id)).one_or_none()
        if current is None:
            log.warning("job %s does not exist; message dropped", job_id)
            return None
        row = connection.execute(take_over, {"job": job_id, "lease": lease, "owner": owner,
                                             "stale": settings.heartbeat_stale_seconds,
                                             "dead": _dead_owner(current.lease_owner)}).one_or_none()
        if row is None:
            return None
    if row.attempts > settings.max_job_attempts:
        connection.execute(_GIVE_UP, {"job": job_id, "lease": lease, "error": (
            f"gave up after {row.attempts - 1} attempts: the worker running this job was lost each time")})
        return None
    return Claim(lease, row.kind, row.params, row.checkpoint, row.attempts, dict(row.result or {}),
                 row.subject if subject is not None else None)


_PROGRESS = update(Job).where(*_HELD, Job.state == R).values(
    records_processed=Job.records_processed + bindparam("p"), records_failed=Job.records_failed + bindparam("f"),
    checkpoint=bindparam("c"), progress=func.greatest(Job.progress, func.coalesce(bindparam("g"), Job.progress)),
    heartbeat_at=func.now())
_RESTART = update(Job).where(*_HELD, Job.state == R).values(
    records_processed=0, records_failed=0, progress=0, checkpoint={})
_BEAT = update(Job).where(*_HELD).values(heartbeat_at=func.now())


def progress(connection: Connection, job_id: str, lease: str, *, processed: int, failed: int, checkpoint: dict,
             percent: int | None) -> bool:
    """Count a batch in the attempt's transaction; False if the attempt no longer holds the job."""
    return connection.execute(_PROGRESS, {"job": job_id, "lease": lease, "p": processed, "f": failed,
                                          "c": checkpoint, "g": percent}).rowcount > 0


def restart(connection: Connection, job_id: str, lease: str) -> bool:
    return connection.execute(_RESTART, {"job": job_id, "lease": lease}).rowcount > 0


def beat(connection: Connection, job_id: str, lease: str) -> None:
    connection.execute(_BEAT, {"job": job_id, "lease": lease})


def _ending(state: JobState) -> Update:
    """RUNNING -> STATE, or a cancelling job -> cancelled, for the attempt holding the lease."""
    return _moving({R: state, CG: C}, *_HELD, finished_at=func.now(), lease_id=None, result=bindparam("result"),
                   error=bindparam("error"),
                   records_processed=Job.records_processed + bindparam("processed"),
                   progress=case((Job.state == R, 100), else_=Job.progress) if state == S else Job.progress,
                   ).returning(Job.state, Job.records_processed, Job.records_failed,
                               (Job.finished_at - Job.started_at).label("took"))


_END = {state: Prepared(_ending(state)) for state in (S, F, C)}


@dataclass(frozen=True)
class SuccessWrites:
    """Rows a job writes only if it succeeds, in the very statement that ends it (a scenario run's
    outputs): BUILD makes their INSERTs, each selecting its rows only where the gate it is given holds
    (the end left the job succeeded); PARAMS are their parameters (named apart from the end's own).
    BUILD should be a module's function: the statement it makes is built once and kept."""

    build: Callable[[ColumnElement[bool]], Sequence[Insert]]
    params: Mapping[str, Any]


@functools.cache
def _ending_with(state: JobState, build: Callable[[ColumnElement[bool]], Sequence[Insert]]) -> Prepared:
    ended = _ending(state).cte("ended")
    succeeded = exists().where(ended.c.state == S.value)
    return Prepared(select(ended).add_cte(*(write.cte(f"write_{i}") for i, write in enumerate(build(succeeded)))))


def end(connection: Connection, job_id: str, lease: str, state: JobState, *, result: dict, error: str | None,
        processed: int = 0, writes: SuccessWrites | None = None) -> Any:
    """End the attempt's job in STATE (a cancelling one is cancelled); the row as it ended, or None
    if the attempt no longer holds it. Its end event is written by the trigger, in this statement's
    transaction. WRITES are made by the same statement, if it leaves the job succeeded: one round trip,
    and its own transaction on an autocommit connection."""
    values = {"job": job_id, "lease": lease, "result": result, "error": error, "processed": processed}
    if writes is None:
        return _END[state].execute(connection, values).fetchone()
    return _ending_with(state, writes.build).execute(connection, {**writes.params, **values}).fetchone()


# --- the reaper's transitions ----------------------------------------------------------------------

_TIME_OUT = _moving({R: F, CG: C}, Job.started_at < func.now() - func.make_interval(
    0, 0, 0, 0, 0, 0, Job.timeout_seconds), finished_at=func.now(), lease_id=None,
    error=func.format("timed out after %s seconds", Job.timeout_seconds)).returning(Job.id)
_REQUEUE = _moving({R: Q}, _STALE, Job.attempts < bindparam("most"), lease_id=None, **_NEW_MESSAGE).returning(*_SENT)
_ABANDON = _moving({R: F}, _STALE, Job.attempts >= bindparam("most"), lease_id=None, finished_at=func.now(),
                   error=func.format("gave up after %s attempts: the worker running this job was lost each time",
                                     Job.attempts)).returning(Job.id)
_CANCEL_STALE = _moving({CG: C}, _STALE, finished_at=func.now(), lease_id=None)


def time_out(session: Session) -> list[str]:
    """Fail (or, when cancelling, cancel) every job running longer than its timeout."""
    return list(session.execute(_TIME_OUT).scalars())


def requeue_silent(session: Session, send: Sender) -> tuple[list[str], list[str]]:
    """Jobs whose attempt stopped sending heartbeats (its whole worker died): queued and sent again,
    or failed once they have had every attempt. (requeued, given up)"""
    settings = get_settings()
    stale = {"stale": settings.heartbeat_stale_seconds, "most": settings.max_job_attempts}
    requeued = _send_after_commit(session, send, session.execute(_REQUEUE, stale))
    given_up = list(session.execute(_ABANDON, stale).scalars())
    session.execute(_CANCEL_STALE, stale)  # a stale cancelling job has no attempt left to notice
    return requeued, given_up


def log_end(kind: str, job_id: str, ended: Any, error: str | None) -> None:
    """What a person watching the console wants to see of each job."""
    took = ended.took.total_seconds() if ended.took else 0.0
    log.info("%s %s %s in %.1f s: %s records, %s quarantined%s", kind, job_id, ended.state, took,
             ended.records_processed, ended.records_failed, f"; {error}" if error else "")

