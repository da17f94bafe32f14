"""Ingestion tasks: load the job, run it through `pipelines`, record the outcome."""

from pipelines.core.db import session_scope
from pipelines.ingestion import ingest
from pipelines.jobs import machine, schedules
from worker.app import app
from worker.dispatch import relay_webhooks
from worker.queues import Queues


@app.task(name="ingest.run", queue=Queues.INGEST.value)
def run(job_id: str) -> str:
    outcome = machine.execute(job_id, ingest.run)
    relay_webhooks()  # the job's end event went out with its final state: deliver it now
    return outcome


@app.task(name="ingest.scheduled", queue=Queues.DEFAULT.value)
def scheduled(source_id: str) -> str | None:
    """Beat's tick for a scheduled source: queue a run, or record it skipped if one is active."""
    from worker.dispatch import send_job

    with session_scope() as session:
        return schedules.start_scheduled(session, source_id, send_job)
