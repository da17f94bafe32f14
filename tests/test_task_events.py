"""INGOT_WORKER_TASK_EVENTS=false: a worker sends no task events (Flower's feed) until a monitor asks
for them, as Flower does every few seconds; its heartbeats go out all along."""

from __future__ import annotations

import threading

import pytest

from testkit.datagen import sources_toml, write_csv
from tests.helpers import wait_for

pytestmark = pytest.mark.worker


class Events(threading.Thread):
    """Every Celery event on the broker, from the moment it listens, as (type, task uuid)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: list[tuple[str, str | None]] = []
        self.receiver = None

    def run(self) -> None:
        from worker.app import app

        with app.connection_for_read() as connection:
            self.receiver = app.events.Receiver(
                connection, handlers={"*": lambda event: self.seen.append((event["type"], event.get("uuid")))})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def count(self, kind: str) -> int:
        return sum(1 for seen, _uuid in list(self.seen) if seen == kind)

    def tasks(self) -> list[str]:
        return [seen for seen, _uuid in list(self.seen) if seen.startswith("task-")]

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)


def test_a_worker_without_task_events_sends_them_once_a_monitor_asks(client, start_worker, write_sources, data_dir):
    from worker.app import app

    write_csv(data_dir / "prices.csv", 20)
    write_sources(sources_toml("prices", "prices.csv"))
    start_worker(env={"INGOT_WORKER_TASK_EVENTS": "false"})
    events = Events()
    events.start()
    try:
        # Listening, and the worker's own events flow: its heartbeats (every 2 s).
        wait_for(lambda: events.count("worker-heartbeat") >= 1, timeout=30, message="a worker heartbeat")
        first = client.wait(client.start_ingestion(["prices"], mode="full")["job_id"], timeout=60)
        assert first["state"] == "succeeded", first
        beats = events.count("worker-heartbeat")
        wait_for(lambda: events.count("worker-heartbeat") > beats, timeout=30, message="a heartbeat after the job")
        assert events.tasks() == []  # the job ran, and no task event went out

        app.control.enable_events()  # what Flower sends
        second = client.wait(client.start_ingestion(["prices"], mode="full")["job_id"], timeout=60)
        assert second["state"] == "succeeded", second
        wait_for(lambda: "task-succeeded" in events.tasks(), timeout=30, message="the second job's task events")
        assert {"task-received", "task-started", "task-succeeded"} <= set(events.tasks()), events.tasks()
    finally:
        events.stop()


def test_task_events_go_to_the_broker_a_batch_at_a_time_and_every_one_arrives(start_worker):
    """A worker sends Flower's task events in one message for all those of a short while
    (`worker.consumer`), not one message for every event or two: 40 tasks' 120 events in far fewer
    PUBLISH commands on the real broker, and every event of every task received."""
    from tests.helpers import broker
    from worker.app import app
    from worker.queues import JOB_TASKS

    start_worker(concurrency=2, beat=False)
    events = Events()
    events.start()
    redis = broker()

    def publishes() -> int:
        return int(redis.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))

    try:
        wait_for(lambda: events.count("worker-heartbeat") >= 1, timeout=30, message="a worker heartbeat")
        before = publishes()
        name, queue = JOB_TASKS["scenario_run"]
        # Runs of jobs that do not exist: each task finds no job and ends at once, its three events sent.
        ids = [app.send_task(name, args=[f"job_none_{n}"], queue=queue.value).id for n in range(40)]
        wait_for(lambda: all((kind, task) in events.seen for task in ids for kind in ("task-received", "task-started",
                                                                                        "task-succeeded")),
                 timeout=60, message="every task's three events")
        sent = publishes() - before
    finally:
        events.stop()
    assert sent < 40, f"{sent} PUBLISH commands for 120 task events"
