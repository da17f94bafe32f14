"""Housekeeping on the default queue: the reaper, export expiry and retention.

Housekeeping sends no task events, so Flower lists people's work, not a reaper tick every 30 s;
its log lines are at debug (see worker.signals).
"""

from pipelines.exports import export
from pipelines.jobs import reaper, retention
from worker.app import app
from worker.dispatch import queue_depth, send_job
from worker.queues import Queues


@app.task(name="jobs.reap", queue=Queues.DEFAULT.value, send_events=False)
def reap() -> dict:
    return reaper.reap(send_job, queue_depth)


@app.task(name="exports.expire", queue=Queues.DEFAULT.value, send_events=False)
def expire_exports() -> list[str]:
    return export.expire()


@app.task(name="retention.purge", queue=Queues.DEFAULT.value, send_events=False)
def purge() -> dict[str, int]:
    return retention.purge()
