"""Export tasks: load the job, write the file through `pipelines.export`, record the outcome."""

from pipelines import export, jobs
from worker.app import app
from worker.queues import Queues


@app.task(name="export.run", queue=Queues.EXPORT.value)
def run(job_id: str) -> str:
    return jobs.execute(job_id, export.run)
