"""How long a server asks to be left alone: the `Retry-After` of a 429 or 503 answer."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime

import httpx


def retry_after(response: httpx.Response | None, cap: float) -> float | None:
    """Seconds RESPONSE asks to wait before the next try, at most CAP: its `Retry-After` as
    delta-seconds or as an HTTP date, on a 429 or 503 answer only. None when there is nothing usable.

    >>> retry_after(httpx.Response(429, headers={"Retry-After": "7"}), cap=60)
    7.0
    """
    if response is None or response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return min(float(value), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT; a sloppy one without a zone is taken so
        when = when.replace(tzinfo=UTC)
    return min(max((when - datetime.now(UTC)).total_seconds(), 0.0), cap)
