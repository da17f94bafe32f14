"""The baseline `bench/backlog.py` measures Ingot against: bare Celery no-op tasks, configured as Ingot's
workers are (Redis broker, late acks, prefetch 1, rejected when the worker is lost), on the same broker.

Each task counts itself with one INCR, so the benchmark knows every one ran, and exactly once.
Run by the benchmark as `celery -A bare_celery worker` from this folder; BARE_BROKER_URL names the broker.
"""

from __future__ import annotations

import os

import redis
from celery import Celery
from celery.signals import worker_process_init

QUEUE = "bare"
COUNTER = "bare:done"

app = Celery("bare", broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
                worker_prefetch_multiplier=1, task_default_queue=QUEUE, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
_counter: redis.Redis | None = None


@worker_process_init.connect
def _connect(**_kwargs) -> None:
    global _counter
    _counter = redis.Redis.from_url(os.environ["BARE_COUNTER_URL"])


@app.task(name="bare.noop")
def noop(n: int) -> None:
    assert _counter is not None
    _counter.incr(COUNTER)
