"""The beat schedule: housekeeping, plus one entry per scheduled source (its own `schedule`, or the
ingestion interval: `pipelines.jobs.schedules.of_source`).

It is built when beat starts (`SourcesScheduler`), never at import. A source whose schedule cannot
be used is left out with an error logged (the registry already shows it on `/sources/{id}`); the
others are scheduled as usual. Cron expressions are read by croniter through
`pipelines.jobs.schedules`, the same parser `sources.toml` is checked with.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery.beat import PersistentScheduler
from celery.schedules import BaseSchedule, schedstate

from pipelines.core.settings import Settings, get_settings
from pipelines.jobs.schedules import Schedule, of_source, parse
from worker.queues import Queues

log = logging.getLogger(__name__)


class cron(BaseSchedule):  # noqa: N801  (named like Celery's own schedules)
    """A standard five-field cron expression (minute hour day-of-month month day-of-week), UTC."""

    def __init__(self, expression: str, nowfun=None, app=None):
        self.expression = expression
        self.parsed: Schedule = parse(expression)
        super().__init__(nowfun=nowfun, app=app)

    def next_after(self, moment: datetime) -> datetime:
        return self.parsed.next_after(self.maybe_make_aware(moment))

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return self.next_after(last_run_at) - self.now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        remaining = self.remaining_estimate(last_run_at).total_seconds()
        if remaining > 0:
            return schedstate(False, remaining)
        now = self.now()
        return schedstate(True, (self.next_after(now) - now).total_seconds())

    def __reduce__(self):
        return self.__class__, (self.expression,)

    def __eq__(self, other) -> bool:
        return isinstance(other, cron) and other.expression == self.expression

    def __repr__(self) -> str:
        return f"<cron {self.expression!r}>"


def _housekeeping(name: str, every: float, queue: Queues) -> dict:
    # Late runs are dropped rather than piled up: the next one does the same work.
    return {"task": name, "schedule": every, "options": {"queue": queue.value, "expires": every}}


def beat_schedule(settings: Settings) -> dict:
    entries = {
        "jobs.reap": _housekeeping("jobs.reap", settings.reaper_interval_seconds, Queues.DEFAULT),
        "webhooks.relay": _housekeeping("webhooks.relay", settings.webhook_relay_interval_seconds, Queues.WEBHOOKS),
        "exports.expire": _housekeeping("exports.expire", settings.export_expiry_interval_seconds, Queues.DEFAULT),
        "retention.purge": _housekeeping("retention.purge", settings.retention_interval_seconds, Queues.DEFAULT),
    }
    from pipelines.ingestion.sources.registry import SourceError, load_registry

    try:
        registry = load_registry(settings.sources_file, settings.data_root_paths, settings.home)
    except SourceError as exc:
        log.error("no source schedules: %s", exc)
        return entries
    for source_id, error in registry.errors.items():
        log.error("source %s is not scheduled: %s", source_id, error)
    for source_id, source in registry.sources.items():
        spec = of_source(source, settings.ingestion_interval_seconds)
        if spec is None:
            continue
        try:
            parsed = parse(spec)
            every = parsed.every_seconds
            schedule = timedelta(seconds=every) if every else cron(spec)
        except ValueError as exc:
            log.error("source %s is not scheduled: %s", source_id, exc)
            continue
        entries[f"ingest:{source_id}"] = {
            "task": "ingest.scheduled",
            "schedule": schedule,
            "args": (source_id,),
            "options": {"queue": Queues.DEFAULT.value, "expires": parsed.expires_seconds},
        }
    return entries


HOUSEKEEPING = ("jobs.reap", "webhooks.relay", "exports.expire", "retention.purge")


class SourcesScheduler(PersistentScheduler):
    """Celery's persistent scheduler, with the schedule read from `sources.toml` as beat starts."""

    def setup_schedule(self) -> None:
        from pipelines.core import runtime

        # The intervals an admin changed through PUT /config (they say "restart required") apply here.
        settings = get_settings()
        restart = {name: runtime.value(name) for name, knob in runtime.KNOBS.items() if knob.restart}
        self.app.conf.beat_schedule = beat_schedule(settings.model_copy(update=restart))
        # Beat sends only housekeeping and schedule ticks: no "sent" events, so Flower lists them
        # only if their task reports itself (housekeeping does not).
        self.app.conf.task_send_sent_event = False
        super().setup_schedule()
