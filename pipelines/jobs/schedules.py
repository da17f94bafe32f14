"""Schedules from sources.toml: `every 60s` (s, m, h) or a standard five-field cron expression.

Cron fields are in the standard order (minute, hour, day of month, month, day of week) and read by
croniter, in UTC; an expression croniter refuses (`99 99 * * *`) is an error on that source alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from croniter import CroniterError, croniter
from sqlalchemy import text
from sqlalchemy.orm import Session

from pipelines.jobs import control, journal, machine

_EVERY = re.compile(r"^every\s+(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)$", re.I)
_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Schedule:
    every_seconds: float | None = None
    cron: str | None = None

    @property
    def expires_seconds(self) -> float:
        """A run not started within one period is dropped: the next one will do the same work."""
        return self.every_seconds or 60.0

    def next_after(self, moment: datetime) -> datetime:
        """The first time this schedule fires after MOMENT (an aware datetime)."""
        if self.every_seconds is not None:
            return moment + timedelta(seconds=self.every_seconds)
        assert self.cron is not None
        return croniter(self.cron, moment).get_next(datetime)


def parse(spec: str) -> Schedule:
    """SPEC as a Schedule; ValueError saying what is accepted otherwise."""
    spec = spec.strip()
    match = _EVERY.match(spec)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)[0].lower()]
        if seconds < 1:
            raise ValueError("a schedule must be at least 'every 1s'")
        return Schedule(every_seconds=seconds)
    fields = spec.split()
    if len(fields) != 5:
        raise ValueError(f"schedule {spec!r} is neither 'every N s|m|h' nor a five-field cron expression "
                         "(minute hour day-of-month month day-of-week)")
    try:
        croniter(spec)
    except (CroniterError, ValueError, KeyError) as exc:
        raise ValueError(f"schedule {spec!r} is not a valid cron expression: {exc}") from None
    return Schedule(cron=" ".join(fields))


def of_source(source, interval_seconds: int) -> str | None:
    """The schedule SOURCE runs on, or None: its own `schedule`, else the ingestion interval (the
    runtime setting `ingestion_interval_seconds`; 0 leaves such sources to be run on request). A
    disabled source runs on none. Beat and `/sources` both ask here."""
    if not source.enabled:
        return None
    if source.schedule:
        return source.schedule
    return f"every {interval_seconds}s" if interval_seconds > 0 else None


def next_run(spec: str, last_fired: datetime | None, now: datetime) -> datetime | None:
    """When beat next fires SPEC, having last fired it at LAST_FIRED: as beat decides it (an interval
    from its last tick, `worker.schedule`'s cron from the last tick), and now when that is past (beat
    fires a late tick at once). None for a schedule that cannot be read (beat leaves it out)."""
    try:
        schedule = parse(spec)
    except ValueError:
        return None
    if last_fired is None:
        return now if schedule.every_seconds is not None else schedule.next_after(now)
    return max(schedule.next_after(last_fired), now)


_FIRED = ("INSERT INTO source_state (source, status, successful, failed, skipped, last_skipped_at, last_scheduled_at) "
          "VALUES (:s, :status, 0, 0, :skipped, CASE WHEN :skipped = 1 THEN now() END, now()) "
          "ON CONFLICT (source) DO UPDATE SET last_scheduled_at = now(), "
          "skipped = source_state.skipped + :skipped, "
          "last_skipped_at = CASE WHEN :skipped = 1 THEN now() ELSE source_state.last_skipped_at END")


def start_scheduled(session: Session, source_id: str, send: machine.Sender) -> str | None:
    """Queue a scheduled incremental run of SOURCE_ID, or record it skipped if one is already active."""
    try:
        job = control.start_ingestion(session, [source_id], {"mode": "incremental"}, send, request_id="schedule")
    except control.SourcesBusy:
        session.execute(text(_FIRED), {"s": source_id, "status": "running", "skipped": 1})
        journal.record(session, "ingestion.skipped", f"scheduled run of {source_id} skipped: a run is still active",
                       source=source_id)
        return None
    session.execute(text(_FIRED), {"s": source_id, "status": "never_run", "skipped": 0})
    journal.record(session, "ingestion.scheduled", f"scheduled run of {source_id} queued as {job.id}",
                   source=source_id, job_id=job.id)
    return job.id
