"""Time as Ingot writes it: UTC, ISO 8601, with a `Z`."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_z(value: datetime) -> str:
    """VALUE (timezone-aware) in UTC as ISO 8601 with a `Z`: `2026-01-02T03:04:05.123456Z`."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
