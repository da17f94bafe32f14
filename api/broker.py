"""What the API asks of the broker: is it there, how deep are the queues, who is listening."""

from __future__ import annotations

import redis

from worker.app import app
from worker.dispatch import broker_redis
from worker.queues import Queues


def broker_status() -> bool:
    try:
        return bool(broker_redis().ping())
    except redis.RedisError:
        return False


def queue_depths() -> dict[str, int]:
    client = broker_redis()
    return {q.value: client.llen(q.value) for q in Queues}


def workers_online() -> int:
    try:
        return len(app.control.ping(timeout=0.5) or [])
    except Exception:
        return 0
