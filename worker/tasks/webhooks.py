"""Webhook tasks: the relay (outbox to deliveries) and a batch of delivery attempts."""

from __future__ import annotations

import os
import threading

import httpcore

from pipelines.core.settings import get_settings
from pipelines.webhooks import delivery
from worker.app import app
from worker.queues import Queues

_lock = threading.Lock()
_pools: dict[int, httpcore.ConnectionPool] = {}


def _pool() -> httpcore.ConnectionPool:
    """One connection pool per worker process, made after the fork, shared by the threads that send
    a batch."""
    with _lock:
        pool = _pools.get(os.getpid())
        if pool is None:
            pool = _pools[os.getpid()] = delivery.new_pool(get_settings().webhook_concurrency * 2)
        return pool


@app.task(name="webhooks.deliver", queue=Queues.WEBHOOKS.value)
def deliver(delivery_ids: list[str] | str) -> dict[str, str]:
    """One attempt at each delivery of a batch (the relay sends up to INGOT_WEBHOOK_BATCH_SIZE at once)."""
    ids = [delivery_ids] if isinstance(delivery_ids, str) else delivery_ids
    return delivery.deliver(ids, _pool(), get_settings().webhook_concurrency)


@app.task(name="webhooks.relay", queue=Queues.WEBHOOKS.value, send_events=False)
def relay() -> int:
    """The safety net: the outbox listener (worker.outbox) relays as events are committed. Also marks
    disabled the endpoints of keys that expired since (none receives anything meanwhile)."""
    from pipelines.core.db import session_scope
    from pipelines.webhooks import endpoints
    from worker.dispatch import relay_webhooks

    with session_scope() as session:
        endpoints.close_orphaned(session)
    return relay_webhooks()
