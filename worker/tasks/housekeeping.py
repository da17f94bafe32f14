"""Housekeeping on the default queue: the reaper."""

from pipelines import export, jobs
from worker.app import app
from worker.dispatch import message_exists, send_job
from worker.queues import Queues


@app.task(name="jobs.reap", queue=Queues.DEFAULT.value)
def reap() -> dict:
    return jobs.reap(send_job, message_exists)


@app.task(name="exports.expire", queue=Queues.DEFAULT.value)
def expire_exports() -> list[str]:
    return export.expire()
