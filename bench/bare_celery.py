"""The baselines `bench/backlog.py` measures Ingot against, configured as Ingot's workers are (Redis
broker, late acks, prefetch 1, rejected when the worker is lost), on the same broker.

- `bare.noop`: bare Celery. Each task counts itself with one INCR, so the benchmark knows every one
  ran, and exactly once.
- `bare.row`: the floor of any job system whose row decides, as Ingot's does. The publisher inserts
  the task's row before it publishes; the task claims it with one guarded UPDATE (`queued` to
  `running`, the attempt counted) and ends it with another (`running` to `succeeded`), each its own
  commit. No API, no events, no outputs, no webhooks: what is left is Celery plus three commits.

Run by the benchmark as `celery -A bare_celery worker` from this folder; BARE_BROKER_URL names the
broker, BARE_COUNTER_URL the Redis that counts, BARE_DATABASE_URL (libpq) the database of the rows.
"""

from __future__ import annotations

import os

import redis
from celery import Celery
from celery.signals import worker_process_init

QUEUE = "bare"
COUNTER = "bare:done"
TABLE_DDL = ("CREATE TABLE IF NOT EXISTS bench_floor (id bigint PRIMARY KEY, state text NOT NULL, "
             "attempts int NOT NULL DEFAULT 0, started_at timestamptz, ended_at timestamptz)")

app = Celery("bare", broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
                worker_prefetch_multiplier=1, task_default_queue=QUEUE, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
_counter: redis.Redis | None = None
_database = None


@worker_process_init.connect
def _connect(**_kwargs) -> None:
    global _counter, _database
    _counter = redis.Redis.from_url(os.environ["BARE_COUNTER_URL"])
    if os.environ.get("BARE_DATABASE_URL"):
        import psycopg

        _database = psycopg.connect(os.environ["BARE_DATABASE_URL"], autocommit=True)


@app.task(name="bare.noop")
def noop(n: int) -> None:
    assert _counter is not None
    _counter.incr(COUNTER)


@app.task(name="bare.row")
def row(n: int) -> None:
    assert _database is not None
    claimed = _database.execute("UPDATE bench_floor SET state = 'running', attempts = attempts + 1, "
                                "started_at = now() WHERE id = %s AND state = 'queued'", (n,)).rowcount
    if claimed:
        _database.execute("UPDATE bench_floor SET state = 'succeeded', ended_at = now() "
                          "WHERE id = %s AND state = 'running'", (n,))
        assert _counter is not None
        _counter.incr(COUNTER)  # counted as a no-op task counts itself: the run is watched in Redis, not by a scan
