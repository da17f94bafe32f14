"""Scenario runs: load the job, shock the curves through `pipelines.scenarios.runs`, record the outcome.

The run's end event commits with its final state and wakes the webhook relay (worker.outbox)."""

from pipelines.core.models import JobKind
from pipelines.jobs import attempt
from pipelines.scenarios import runs
from worker.app import job_task


@job_task(JobKind.SCENARIO_RUN)
def run(job_id: str) -> str:
    return attempt.execute(job_id, runs.run, subject=runs.SCENARIO)
