"""Webhook tasks: the relay (outbox to deliveries) and one delivery attempt."""

from __future__ import annotations

import threading

import httpx

from pipelines.core.settings import get_settings
from pipelines.webhooks import delivery
from worker.app import app
from worker.queues import Queues

_local = threading.local()


def _client() -> httpx.Client:
    """One connection pool per worker thread, made after the fork, never following redirects."""
    if getattr(_local, "client", None) is None:
        _local.client = httpx.Client(timeout=get_settings().webhook_timeout_seconds, follow_redirects=False)
    return _local.client


@app.task(name="webhooks.deliver", queue=Queues.WEBHOOKS.value)
def deliver(delivery_id: str) -> str:
    return delivery.deliver(delivery_id, _client())


@app.task(name="webhooks.relay", queue=Queues.WEBHOOKS.value, send_events=False)
def relay() -> int:
    """The safety net: the outbox listener (worker.outbox) relays as events are committed."""
    from worker.dispatch import relay_webhooks

    return relay_webhooks()
