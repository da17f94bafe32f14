"""Export tasks: load the job, write the file through `pipelines.exports.export`, record the outcome.

The job's end event commits with its final state and wakes the webhook relay (worker.outbox)."""

from pipelines.core.models import JobKind
from pipelines.exports import export
from pipelines.jobs import attempt
from worker.app import job_task


@job_task(JobKind.EXPORT)
def run(job_id: str) -> str:
    return attempt.execute(job_id, export.run)
