"""Jobs as callers look them up: one by id, pages of them, and the ingestion overview."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from pipelines.core import adb
from pipelines.core.models import ACTIVE_STATES, FINAL_STATES, Job, JobKind, JobState
from pipelines.core.pagination import Keyset

NEWEST_FIRST = Keyset((Job.created_at, Job.id), descending=True)


def visible(kind: str, job_owner: str | None, owner: str | None) -> bool:
    """Whether a job is shown to a caller who may see OWNER's objects (None: an admin, everyone's).
    An export belongs to the key or user that made it; every other job is shared by every reader."""
    return owner is None or kind != JobKind.EXPORT or job_owner == owner


def get(session: Session, job_id: str, kind: JobKind | None = None, owner: str | None = None) -> Job | None:
    """The job JOB_ID (of KIND, when given), or None; None too for another's export when OWNER is given."""
    job = session.get(Job, job_id, populate_existing=True)  # as this transaction left it
    if job is None or (kind is not None and job.kind != kind) or not visible(job.kind, job.api_key_id, owner):
        return None
    return job


def page(session: Session, *, kind: JobKind | None, state: JobState | None, cursor: str | None, limit: int,
         owner: str | None = None) -> tuple[list[Job], str | None]:
    """Jobs newest first, filtered (and without others' exports when OWNER is given); BadCursor for a
    cursor that is not ours."""
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if state:
        query = query.where(Job.state == state)
    if owner is not None:
        query = query.where(or_(Job.kind != JobKind.EXPORT, Job.api_key_id == owner))
    return NEWEST_FIRST.page(session, query, cursor, limit)


# On the API's event loop (pipelines.core.adb): rows as dicts, in one round trip each.

_JOB = ("SELECT id, kind, state, progress, records_processed, records_failed, params, result, error, created_at, "
        "started_at, finished_at, request_id, celery_task_id, attempts, sources, api_key_id FROM jobs WHERE id = %s")

_OVERVIEW = (
    "(SELECT 'current' AS slot, id, state, progress, records_processed, records_failed, started_at, finished_at "
    " FROM jobs WHERE kind = 'ingestion' AND state = ANY(%(active)s) ORDER BY created_at DESC LIMIT 1) "
    "UNION ALL "
    "(SELECT 'last', id, state, progress, records_processed, records_failed, started_at, finished_at "
    " FROM jobs WHERE kind = 'ingestion' AND state = ANY(%(final)s) ORDER BY finished_at DESC LIMIT 1)"
)


async def fetch_job(job_id: str, owner: str | None = None) -> dict[str, Any] | None:
    """The job JOB_ID as a row, or None; None too for another's export when OWNER is given."""
    row = await adb.fetch_one(_JOB, (job_id,))
    if row is None or not visible(row["kind"], row.pop("api_key_id"), owner):
        return None
    return row


async def fetch_ingestion_overview() -> dict[str, dict[str, Any] | None]:
    """The ingestion overview: the newest ingestion still queued, running or cancelling ("current"),
    and the one that ended last ("last"), as rows (None where there is none)."""
    rows = await adb.fetch(_OVERVIEW, {"active": [str(s) for s in ACTIVE_STATES],
                                       "final": [str(s) for s in FINAL_STATES]})
    found = {row.pop("slot"): row for row in rows}
    return {"current": found.get("current"), "last": found.get("last")}
