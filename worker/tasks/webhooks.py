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
            pool = _pools[os.getpid()] = delivery.new_pool(get_settings().webhook_concurrency * 4)
        return pool


@app.task(name="webhooks.deliver", queue=Queues.WEBHOOKS.value)
def deliver(delivery_ids: list[str] | str) -> dict[str, str]:
    """One attempt at each delivery of a batch (the relay sends up to INGOT_WEBHOOK_BATCH_SIZE at once)."""
    ids = [delivery_ids] if isinstance(delivery_ids, str) else delivery_ids
    settings = get_settings()
    # A receiver still silent after INGOT_WEBHOOK_HAND_OFF_SECONDS is left to a thread of this process: the next batch
    # need not wait for it.
    return delivery.deliver(ids, _pool(), settings.webhook_concurrency, hand_off=settings.webhook_hand_off_seconds)


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
