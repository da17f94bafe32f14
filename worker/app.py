"""The Celery app: Redis broker, late acknowledgement, one queue per kind, events for Flower."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipelines import embedded
from pipelines.settings import get_settings
from worker.queues import Queues
from worker.schedule import beat_schedule


def create_app() -> Celery:
    settings = get_settings()
    tasks = ["worker.tasks.ingest", "worker.tasks.export", "worker.tasks.webhooks", "worker.tasks.housekeeping"]
    app = Celery("ingot", include=tasks)
    app.conf.update(
        broker_url=embedded.celery_broker_url(embedded.redis_url(settings)),
        broker_connection_retry_on_startup=True,
        # The job row in PostgreSQL is the truth; Celery needs no result backend.
        task_ignore_result=True,
        task_queues=[Queue(q.value) for q in Queues],
        task_default_queue=Queues.DEFAULT.value,
        # At-least-once: acknowledge after the work, give the message back if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Longer than the longest job: the reaper, not this timeout, recovers work from dead workers.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        # Flower lists every task with its state only when both sides send events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        worker_concurrency=settings.worker_concurrency,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )
    return app


app = create_app()

import worker.signals  # noqa: E402,F401  (connects per-process set-up)
