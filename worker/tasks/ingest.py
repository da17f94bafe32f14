"""Ingestion tasks: load the job, run it through `pipelines`, record the outcome.

The job's end event commits with its final state and wakes the webhook relay (worker.outbox)."""

from pipelines.core.db import session_scope
from pipelines.core.models import JobKind
from pipelines.ingestion import ingest
from pipelines.jobs import attempt, schedules
from worker.app import app, job_task
from worker.queues import Queues


@job_task(JobKind.INGESTION)
def run(job_id: str) -> str:
    return attempt.execute(job_id, ingest.run)


@app.task(name="ingest.scheduled", queue=Queues.DEFAULT.value)
def scheduled(source_id: str) -> str | None:
    """Beat's tick for a scheduled source: queue a run, or record it skipped if one is active."""
    from worker.dispatch import send_job

    with session_scope() as session:
        return schedules.start_scheduled(session, source_id, send_job)
