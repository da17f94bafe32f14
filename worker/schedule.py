"""The beat schedule: the reaper, plus one entry per source that declares a schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery.schedules import crontab

from pipelines.schedules import parse
from pipelines.settings import Settings
from worker.queues import Queues

log = logging.getLogger(__name__)


def beat_schedule(settings: Settings) -> dict:
    entries = {
        "jobs.reap": {
            "task": "jobs.reap",
            "schedule": settings.reaper_interval_seconds,
            "options": {"queue": Queues.DEFAULT.value, "expires": settings.reaper_interval_seconds},
        },
    }
    entries["webhooks.relay"] = {
        "task": "webhooks.relay",
        "schedule": settings.webhook_relay_interval_seconds,
        "options": {"queue": Queues.WEBHOOKS.value, "expires": settings.webhook_relay_interval_seconds},
    }
    entries["exports.expire"] = {
        "task": "exports.expire",
        "schedule": settings.export_expiry_interval_seconds,
        "options": {"queue": Queues.DEFAULT.value, "expires": settings.export_expiry_interval_seconds},
    }
    from pipelines.sources.registry import SourceError, load_registry

    try:
        registry = load_registry(settings.sources_file, settings.data_root_paths)
    except SourceError as exc:
        log.error("no source schedules: %s", exc)
        return entries
    for source_id, source in registry.sources.items():
        if not (source.enabled and source.schedule):
            continue
        schedule = parse(source.schedule)
        every = schedule.every_seconds
        entries[f"ingest:{source_id}"] = {
            "task": "ingest.scheduled",
            "schedule": timedelta(seconds=every) if every else crontab(*schedule.cron),
            "args": (source_id,),
            # Late runs are dropped rather than piled up: the next one does the same work.
            "options": {"queue": Queues.DEFAULT.value, "expires": schedule.expires_seconds},
        }
    return entries
