"""What the API asks of the broker: is it there, how deep are the queues, who is listening."""

from __future__ import annotations

from worker.app import app
from worker.dispatch import broker_reachable, waiting
from worker.queues import Queues


def broker_status() -> bool:
    return broker_reachable()


def queue_depths() -> dict[str, int]:
    return {q.value: waiting(q.value) or 0 for q in Queues}


def workers_online() -> int:
    try:
        return len(app.control.ping(timeout=0.5) or [])
    except Exception:
        return 0
