"""Export tasks: load the job, write the file through `pipelines.exports.export`, record the outcome."""

from pipelines.exports import export
from pipelines.jobs import machine
from worker.app import app
from worker.dispatch import relay_webhooks
from worker.queues import Queues


@app.task(name="export.run", queue=Queues.EXPORT.value)
def run(job_id: str) -> str:
    outcome = machine.execute(job_id, export.run)
    relay_webhooks()  # the job's end event went out with its final state: deliver it now
    return outcome
