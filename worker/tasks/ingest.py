"""Ingestion tasks: load the job, run it through `pipelines`, record the outcome."""

from pipelines import ingest, jobs
from worker.app import app
from worker.queues import Queues


@app.task(name="ingest.run", queue=Queues.INGEST.value)
def run(job_id: str) -> str:
    return jobs.execute(job_id, ingest.run)
