"""Schedules from sources.toml: `every 60s` (s, m, h) or a five-field cron expression."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from pipelines import jobs, journal

_EVERY = re.compile(r"^every\s+(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)$", re.I)
_UNITS = {"s": 1, "m": 60, "h": 3600}
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z]+$")


@dataclass(frozen=True)
class Schedule:
    every_seconds: float | None = None
    cron: tuple[str, str, str, str, str] | None = None

    @property
    def expires_seconds(self) -> float:
        """A run not started within one period is dropped: the next one will do the same work."""
        return self.every_seconds or 60.0


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
    if len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields):
        return Schedule(cron=tuple(fields))
    raise ValueError(f"schedule {spec!r} is neither 'every N s|m|h' nor a five-field cron expression")


def start_scheduled(session: Session, source_id: str, send: jobs.Sender) -> str | None:
    """Queue a scheduled incremental run of SOURCE_ID, or record it skipped if one is already active."""
    try:
        job = jobs.start_ingestion(session, [source_id], {"mode": "incremental"}, send, request_id="schedule")
    except jobs.SourcesBusy:
        session.execute(
            text(
                "INSERT INTO source_state (source, status, successful, failed, skipped, last_skipped_at) "
                "VALUES (:s, 'running', 0, 0, 1, now()) ON CONFLICT (source) DO UPDATE SET "
                "skipped = source_state.skipped + 1, last_skipped_at = now()"
            ),
            {"s": source_id},
        )
        journal.record(session, "ingestion.skipped", f"scheduled run of {source_id} skipped: a run is still active",
                       source=source_id)
        return None
    journal.record(session, "ingestion.scheduled", f"scheduled run of {source_id} queued as {job.id}",
                   source=source_id, job_id=job.id)
    return job.id
