"""The Celery app: Redis broker (or RabbitMQ), late acknowledgement, one queue per kind, events for Flower.

Importing this module does no work: the configuration (and with it the broker's address, which may
mean starting the embedded Redis) is read the first time Celery needs it, and the beat schedule is
built from `sources.toml` only when beat starts (`worker.schedule.SourcesScheduler`). The API
imports this module to send tasks, and a broken `sources.toml` must never stop it from starting.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipelines.core import embedded
from pipelines.core.settings import get_settings
from worker import broker
from worker.queues import JOB_TASKS, Queues

broker.register()  # kombu's Redis transport, one client per channel: before any connection is made

TASK_MODULES = ["worker.tasks.ingest", "worker.tasks.export", "worker.tasks.scenarios", "worker.tasks.webhooks",
                "worker.tasks.housekeeping"]


def rabbitmq(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _config() -> dict:
    settings = get_settings()
    broker = settings.broker_url or embedded.celery_broker_url(embedded.redis_url(settings))
    # RabbitMQ: quorum queues (replicated, and kept through a broker crash) and publisher confirms (a
    # publish returns once the broker has the message). Redis: a visibility timeout longer than any job.
    amqp = rabbitmq(broker)
    queue_arguments = {"x-queue-type": "quorum"} if amqp else None
    transport = {"confirm_publish": True} if amqp else {"visibility_timeout": settings.visibility_timeout}
    return dict(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        # The job row in PostgreSQL is the truth; Celery needs no result backend.
        task_ignore_result=True,
        task_queues=[Queue(q.value, queue_arguments=queue_arguments) for q in Queues],
        task_default_queue=Queues.DEFAULT.value,
        # At-least-once: acknowledge after the work, give the message back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis: longer than the longest job: the reaper, not this timeout, recovers work from dead workers.
        broker_transport_options=transport,
        # Flower lists every task with its state from the workers' events (received, started, ended).
        # No "sent" event: it doubled the cost of every publish (1.19 against 0.62 ms of CPU, measured),
        # and a backlog of queued jobs is the jobs table's to show (GET /jobs?state=queued), not Flower's.
        # Without Flower they cost a worker CPU for nobody (0.3-0.4 ms a job since worker.broker, 1.6 ms
        # before): INGOT_WORKER_TASK_EVENTS.
        worker_send_task_events=settings.worker_task_events,
        worker_consumer="worker.consumer:Consumer",  # the events a batch at a time
        task_send_sent_event=False,
        task_track_started=True,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
        timezone="UTC",
        enable_utc=True,
        beat_scheduler="worker.schedule:SourcesScheduler",
    )


def create_app() -> Celery:
    app = Celery("ingot", include=TASK_MODULES)
    app.add_defaults(_config)  # read when first needed, not at import
    return app


app = create_app()


def job_task(kind: str):
    """Register the task that runs jobs of KIND, under the name and on the queue `JOB_TASKS` gives it."""
    name, queue = JOB_TASKS[kind]
    return app.task(name=name, queue=queue.value)


import worker.signals  # noqa: E402,F401  (connects per-process set-up)
