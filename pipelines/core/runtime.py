"""Runtime settings: the few that an admin may change while Ingot runs (PUT /api/v1/config).

An override lives in PostgreSQL, so every process sees it; each process re-reads the overrides at
most every few seconds. Anything not overridden is the environment's value. Secrets are not here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from threading import Lock, Thread
from typing import Any, cast

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from pipelines.core.db import get_engine
from pipelines.core.errors import Invalid
from pipelines.core.settings import get_settings


@dataclass(frozen=True)
class Knob:
    kind: type
    low: float | None = None
    high: float | None = None
    restart: bool = False  # applies only once the processes that read it start again
    pattern: str | None = None  # for text: what it must look like (the API's schema says so too)

    def check(self, name: str, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool):
            raise Invalid(f"{name} must be {self.kind.__name__}")
        if self.kind is str:
            return value
        number = cast(float, value)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise Invalid(f"{name} must be between {self.low:g} and {self.high:g}")
        return value


KNOBS = {
    "batch_size": Knob(int, 1, 1_000_000),
    "export_retention_days": Knob(int, 1, 3650),
    "rate_limit_per_minute": Knob(int, 1, 10_000_000),
    "export_rate_limit_per_minute": Knob(int, 1, 100_000),
    "source_test_rate_limit_per_minute": Knob(int, 1, 10_000),
    "login_rate_limit_per_minute": Knob(int, 1, 100_000),
    "max_exports_per_key": Knob(int, 1, 1000),
    "webhook_retry_schedule": Knob(str, pattern=r"^\s*\d+(\.\d+)?\s*(,\s*\d+(\.\d+)?\s*)*$"),
    # Beat builds its schedule when it starts: these wait for a restart of beat.
    "ingestion_interval_seconds": Knob(int, 0, 7 * 86400, restart=True),
    "reaper_interval_seconds": Knob(float, 1, 3600, restart=True),
    "webhook_relay_interval_seconds": Knob(float, 0.1, 3600, restart=True),
    "export_expiry_interval_seconds": Knob(float, 10, 86400, restart=True),
    "retention_days": Knob(int, 0, 36500),
    "retention_interval_seconds": Knob(float, 60, 7 * 86400, restart=True),
}
log = logging.getLogger(__name__)
TTL = 5.0
_cache: dict = {"at": 0.0, "values": {}, "loaded": False}
_lock = Lock()


def _overrides() -> dict:
    """The overrides, re-read at most every TTL seconds by one thread while the others go on with the
    values they have: a caller that already holds a database connection (an API request does) never
    waits here for a thread that waits for a connection. Only the very first read is waited for."""
    if time.monotonic() - _cache["at"] > TTL and _lock.acquire(blocking=not _cache["loaded"]):
        try:
            if time.monotonic() - _cache["at"] > TTL:
                refresh()
        finally:
            _lock.release()
    return _cache["values"]


def refresh() -> None:
    """Read the overrides now (at start-up, and when they are stale)."""
    try:
        with get_engine().connect() as conn:
            _cache["values"] = dict(conn.execute(text("SELECT name, value FROM config_overrides")).all())
        _cache["loaded"] = True
    except OperationalError:  # the database is away: the last values known serve until it is back
        log.warning("runtime settings: the database is unavailable; keeping the last values read")
    _cache["at"] = time.monotonic()


def value(name: str):
    """NAME's current value: the override if an admin set one, else the environment's."""
    return _lookup(_overrides(), name)


def current(name: str):
    """As `value`, for the event loop: never waits on the database. A stale read starts a refresh in
    a thread of its own and goes on with the values it has (only the very first read waits)."""
    if not _cache["loaded"]:
        return value(name)
    if time.monotonic() - _cache["at"] > TTL and _lock.acquire(blocking=False):
        Thread(target=_refresh_and_release, name="runtime-refresh", daemon=True).start()
    return _lookup(_cache["values"], name)


def _lookup(overrides: dict, name: str):
    return overrides[name] if name in overrides else getattr(get_settings(), name)


def _refresh_and_release() -> None:
    try:
        refresh()
    finally:
        _lock.release()


def retry_schedule() -> list[float]:
    """Seconds to wait before each webhook attempt (the first is usually 0)."""
    return _steps(value("webhook_retry_schedule"))


def _steps(schedule: str) -> list[float]:
    try:
        steps = [float(x) for x in schedule.split(",") if x.strip()]
    except ValueError:
        raise Invalid("webhook_retry_schedule must be comma-separated seconds") from None
    if not steps or any(s < 0 for s in steps):
        raise Invalid("webhook_retry_schedule must be comma-separated seconds")
    return steps


def snapshot() -> dict:
    return {name: value(name) for name in KNOBS}


def update(changes: dict) -> list[str]:
    """Validate and store CHANGES (all or none); returns the names that need a restart to apply."""
    unknown = sorted(set(changes) - set(KNOBS))
    if unknown:
        raise Invalid(f"not runtime settings: {unknown}; these are: {sorted(KNOBS)}")
    checked = {name: KNOBS[name].check(name, v) for name, v in changes.items()}
    if "webhook_retry_schedule" in checked:
        _steps(checked["webhook_retry_schedule"])
    with get_engine().begin() as conn:
        for name, v in checked.items():
            conn.execute(text("INSERT INTO config_overrides (name, value, updated_at) VALUES (:n, CAST(:v AS jsonb), "
                              "now()) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"),
                         {"n": name, "v": json.dumps(v)})
    _cache["at"] = 0.0
    return sorted(name for name in checked if KNOBS[name].restart)
