"""Scenario runs: load the job, shock the curves through `pipelines.scenarios.runs`, record the outcome."""

from pipelines.jobs import machine
from pipelines.scenarios import runs
from worker.app import app
from worker.dispatch import relay_webhooks
from worker.queues import Queues


@app.task(name="scenarios.run", queue=Queues.SCENARIOS.value)
def run(job_id: str) -> str:
    outcome = machine.execute(job_id, runs.run)
    relay_webhooks()  # the run's end event went out with its final state: deliver it now
    return outcome
