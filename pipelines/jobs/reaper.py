"""The reaper: finds jobs whose message or worker vanished and sends them again, and ends jobs past
their timeout. Run by beat as a safety net; every decision is one guarded UPDATE, so two reapers at
once (or a reaper racing a late worker) cannot both act on a job."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from pipelines.core.db import on_commit, session_scope
from pipelines.core.models import Job
from pipelines.core.settings import get_settings
from pipelines.jobs.machine import Sender

log = logging.getLogger(__name__)



def _resend(session: Session, job_id: str, send: Sender, reason: str) -> None:
    task_id = str(uuid.uuid4())
    job = session.execute(
        text("UPDATE jobs SET celery_task_id = :t, sent_at = now() WHERE id = :id RETURNING id, kind, queue"),
        {"t": task_id, "id": job_id},
    ).one()
    snapshot = Job(id=job.id, kind=job.kind, queue=job.queue, celery_task_id=task_id)
    on_commit(session, lambda: send(snapshot))
    log.warning("re-sending job %s: %s", job_id, reason)


def reap(send: Sender, message_exists: Callable[[str, str], bool]) -> dict[str, list[str]]:
    """Recover work whose message or worker vanished, and fail work past its timeout."""
    settings = get_settings()
    report: dict[str, list[str]] = {"timed_out": [], "recovered": [], "resent": [], "given_up": []}
    with session_scope() as session:
        report["timed_out"] = list(
            session.execute(
                text(
                    "UPDATE jobs SET state = CASE WHEN state = 'cancelling' THEN 'cancelled' ELSE 'failed' END, "
                    "finished_at = now(), lease_id = NULL, "
                    "error = format('timed out after %s seconds', timeout_seconds) "
                    "WHERE state IN ('running', 'cancelling') "
                    "AND started_at < now() - make_interval(secs => timeout_seconds) RETURNING id"
                )
            ).scalars()
        )
        # A running attempt whose heartbeat stopped: its whole worker died. Put it back in the queue.
        stale = session.execute(
            text(
                "UPDATE jobs SET state = CASE WHEN attempts >= :max THEN 'failed' ELSE 'queued' END, "
                "lease_id = NULL, "
                "finished_at = CASE WHEN attempts >= :max THEN now() END, "
                "error = CASE WHEN attempts >= :max THEN format('gave up after %s attempts: the worker "
                "running this job was lost each time', attempts) END "
                "WHERE state = 'running' AND heartbeat_at < now() - make_interval(secs => :stale) "
                "RETURNING id, state"
            ),
            {"max": settings.max_job_attempts, "stale": settings.heartbeat_stale_seconds},
        ).all()
        for job_id, state in stale:
            if state == "queued":
                report["recovered"].append(job_id)
                _resend(session, job_id, send, "its worker stopped sending heartbeats")
            else:
                report["given_up"].append(job_id)
        # A stale cancelling job has no attempt left to notice: it is simply cancelled.
        session.execute(
            text(
                "UPDATE jobs SET state = 'cancelled', finished_at = now(), lease_id = NULL "
                "WHERE state = 'cancelling' AND heartbeat_at < now() - make_interval(secs => :stale)"
            ),
            {"stale": settings.heartbeat_stale_seconds},
        )
        queued = session.execute(
            text(
                "SELECT id, queue, celery_task_id FROM jobs WHERE state = 'queued' "
                "AND sent_at < now() - make_interval(secs => :grace) FOR UPDATE SKIP LOCKED"
            ),
            {"grace": settings.queued_grace_seconds},
        ).all()
        for job_id, queue, task_id in queued:
            if task_id and message_exists(queue, task_id):
                continue
            report["resent"].append(job_id)
            _resend(session, job_id, send, "its message is no longer in the broker")
    return report
