"""One queue per kind of work, so each scales and fails on its own; and the one table that says which
task and queue carry each kind of job."""

import enum

from pipelines.core.models import JobKind


class Queues(enum.StrEnum):
    INGEST = "ingest"
    EXPORT = "export"
    SCENARIOS = "scenarios"
    WEBHOOKS = "webhooks"
    DEFAULT = "default"


# The task that carries each kind of job, and the queue it travels on: nothing else names them.
JOB_TASKS: dict[str, tuple[str, Queues]] = {
    JobKind.INGESTION: ("ingest.run", Queues.INGEST),
    JobKind.EXPORT: ("export.run", Queues.EXPORT),
    JobKind.SCENARIO_RUN: ("scenarios.run", Queues.SCENARIOS),
}
