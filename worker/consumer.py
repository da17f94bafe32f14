"""Celery's consumer, with Flower's task events sent a batch at a time.

A worker sends three task events a job (received, started, ended). Celery buffers them and sends what
its buffer holds at the next turn of the event loop: under a backlog that is one message on the broker
for every event or two, and py-spy put those publishes at a quarter of a busy worker main process's
CPU. Here the first event buffered schedules the send `EVENT_BATCH_SECONDS` later, so one message
carries every event of that time (Celery still sends at once when its buffer reaches 24). A monitor
sees a task's events that much later; nothing else changes. The worker sends what its buffer still
holds when it stops (Celery's own consumer leaves it to its next turn, which may not come).
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)
EVENT_BATCH_SECONDS = 0.05


class Consumer(CeleryConsumer):
    _events_due = False  # a send of the buffered events is scheduled

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            return super().on_send_event_buffered()
        if not self._events_due:
            self._events_due = True
            self.hub.call_later(EVENT_BATCH_SECONDS, self._send_buffered_events)
        return None

    def _send_buffered_events(self) -> None:
        self._events_due = False
        try:
            self._flush_events()  # events the broker refuses stay buffered for the next send (Celery's)
        except Exception:  # a monitor's feed is never worth a worker's loop
            log.warning("could not send the buffered task events", exc_info=True)

    def stop(self) -> None:
        self._send_buffered_events()
        super().stop()

    def shutdown(self) -> None:
        self._send_buffered_events()
        super().shutdown()
