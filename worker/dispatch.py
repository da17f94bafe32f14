"""Sending job messages, and asking the broker whether a message still exists."""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import redis

from pipelines.core import embedded
from pipelines.core.models import Job
from pipelines.core.settings import get_settings
from worker.app import app
from worker.queues import JOB_TASKS

log = logging.getLogger(__name__)
# kombu's Redis transport keeps priorities 3, 6 and 9 in sibling lists named with this separator.
_PRIORITY_KEYS = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def send_job(job: Job) -> None:
    """Send JOB's message. A broker that is down loses nothing: the reaper re-sends queued jobs."""
    task, _queue = JOB_TASKS[job.kind]
    try:
        app.send_task(task, args=[job.id], queue=job.queue, task_id=job.celery_task_id)
    except Exception:
        log.exception("could not send job %s; the reaper will re-send it", job.id)


@lru_cache
def broker_redis() -> redis.Redis:
    return redis.Redis.from_url(embedded.redis_url(get_settings()))


def message_exists(queue: str, task_id: str) -> bool:
    """Is TASK_ID's message waiting in QUEUE, or delivered to a worker that is still going to run it?

    The reaper asks this of jobs still `queued`. A worker takes a message only when a pool process
    is free (prefetch 1, late acks), so it starts the job within moments; a message delivered longer
    ago than a heartbeat's stale period whose job has still not started was delivered to a worker
    that died. Kombu would hand it out again only after the visibility timeout (hours: longer than
    the longest job), so it counts as gone: the job is sent again, and the old message, should it
    ever be delivered, finds the job taken and does nothing."""
    client = broker_redis()
    needle = task_id.encode()
    for suffix in _PRIORITY_KEYS:
        if any(needle in raw for raw in client.lrange(queue + suffix, 0, -1)):
            return True
    stale = get_settings().heartbeat_stale_seconds
    for tag, raw in client.hgetall("unacked").items():
        if needle in raw:
            delivered = client.zscore("unacked_index", tag)
            return delivered is None or time.time() - delivered < stale
    return False


def revoke(task_id: str) -> None:
    """Tell workers to discard TASK_ID's message (the job row already says cancelled; this is tidiness,
    so Flower shows it revoked and no worker spends a moment on it)."""
    try:
        app.control.revoke(task_id)
    except Exception:
        log.warning("could not broadcast the revocation of %s", task_id, exc_info=True)


def relay_webhooks() -> int:
    """Turn new job events into deliveries and send every delivery that is due (after the commit), in
    batches of INGOT_WEBHOOK_BATCH_SIZE to a task."""
    from pipelines.core.db import session_scope
    from pipelines.webhooks import relay

    try:
        with session_scope() as session:
            due = relay.relay(session)
    except Exception:  # the periodic relay will pick the events up
        log.exception("webhook relay failed")
        return 0
    size = get_settings().webhook_batch_size
    for start in range(0, len(due), size):
        app.send_task("webhooks.deliver", args=[due[start:start + size]], queue="webhooks")
    return len(due)
