"""Sending job messages, and asking the broker how many wait in a queue."""

from __future__ import annotations

import logging
import queue

from pipelines.core.loops import ProcessThread
from pipelines.core.settings import get_settings
from pipelines.jobs.machine import Message
from worker.app import app
from worker.queues import JOB_TASKS, Queues

log = logging.getLogger(__name__)


def send_job(message: Message) -> None:
    """Send a job's message: its kind names the task and the queue. A broker that is down loses
    nothing: the reaper re-sends queued jobs whose message never arrived."""
    task, queue = JOB_TASKS[message.kind]
    try:
        # Flower lists a task's arguments as `argsrepr` says: the job, and what it is about in words, so
        # that "the prices_csv ingestion" can be found there (the task itself takes the id alone).
        shown = f"{message.id!r}, {message.kind} of {message.about}" if message.about else repr(message.id)
        app.send_task(task, args=[message.id], queue=queue.value, task_id=message.task_id, argsrepr=shown)
    except Exception:
        log.exception("could not send job %s; the reaper will re-send it", message.id)


class Publisher(ProcessThread):
    """Sends job messages for an event loop, in order, on a thread of its own: a start answered on the
    loop never waits for the broker's round trip. A message still in its queue when the process dies
    was counted but never sent; the reaper finds and sends it (pipelines.jobs.reaper)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            send_job(self.messages.get())


def send_job_soon(message: Message) -> None:
    """`send_job` on the publisher thread: for code on an event loop."""
    Publisher.of_this_process().messages.put(message)


def waiting(queue: str, *, quiet: bool = False) -> int | None:
    """How many messages wait in QUEUE (those handed to a worker not counted), asked of the broker by
    count, whatever the broker; None if it cannot be asked."""
    try:
        with app.pool.acquire(block=True, timeout=10) as connection:
            # Declared as Celery declares it (a no-op where it exists): the broker answers with its count,
            # in one round trip on the pooled connection's channel, whether or not the queue was there.
            return app.amqp.queues[queue].bind(connection.default_channel).queue_declare().message_count
    except Exception:
        if not quiet:
            log.warning("could not count the messages waiting in %s", queue, exc_info=True)
        return None


def queue_depth(kind: str) -> int | None:
    """How many messages of jobs of KIND wait in their queue (see `waiting`)."""
    return waiting(JOB_TASKS[kind][1].value)


def broker_reachable() -> bool:
    return waiting(Queues.DEFAULT.value, quiet=True) is not None


def revoke(task_id: str) -> None:
    """Tell workers to discard TASK_ID's message (the job row already says cancelled; this is tidiness,
    so Flower shows it revoked and no worker spends a moment on it)."""
    try:
        app.control.revoke(task_id)
    except Exception:
        log.warning("could not broadcast the revocation of %s", task_id, exc_info=True)


def relay_webhooks() -> int:
    """Turn new job events into deliveries and send every delivery that is due (after the commit)."""
    from pipelines.core.db import driver, session_scope
    from pipelines.webhooks import relay

    try:
        with session_scope() as session:
            due = relay.relay(driver(session.connection()))
    except Exception:  # the periodic relay will pick the events up
        log.exception("webhook relay failed")
        return 0
    return send_deliveries(due)


def send_deliveries(due: list[tuple[str, str, bool]]) -> int:
    """Send the deliveries a relay claimed (DUE), in batches of INGOT_WEBHOOK_BATCH_SIZE to a task."""
    for batch in batches(due, get_settings().webhook_batch_size):
        app.send_task("webhooks.deliver", args=[batch], queue="webhooks")
    return len(due)


def batches(due: list[tuple[str, str, bool]], size: int) -> list[list[str]]:
    """DUE (delivery, endpoint, unproven: failing lately or yet to answer) as the deliver tasks'
    batches: the deliveries of endpoints that answer together, SIZE at most to a batch, and each
    unproven endpoint's in a batch of its own, so that a receiver that hangs holds up a batch of its
    own deliveries only."""
    healthy = [delivery for delivery, _endpoint, unproven in due if not unproven]
    apart: dict[str, list[str]] = {}
    for delivery, endpoint, unproven in due:
        if unproven:
            apart.setdefault(endpoint, []).append(delivery)
    return [healthy[i:i + size] for i in range(0, len(healthy), size)] + list(apart.values())
