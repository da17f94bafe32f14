"""One queue per kind of work, so each scales and fails on its own."""

import enum


class Queues(enum.StrEnum):
    INGEST = "ingest"
    EXPORT = "export"
    SCENARIOS = "scenarios"
    WEBHOOKS = "webhooks"
    DEFAULT = "default"


# The task that carries each kind of job, and the queue it travels on.
JOB_TASKS = {
    "ingestion": ("ingest.run", Queues.INGEST),
    "export": ("export.run", Queues.EXPORT),
    "scenario_run": ("scenarios.run", Queues.SCENARIOS),
}
