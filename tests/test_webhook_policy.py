"""The webhook retry and disable policy on its own (`delivery.decide`): no receiver, no worker, no
database; a wrong rule fails here by name rather than as a timeout in an end-to-end test."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipelines.webhooks.delivery import decide

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SCHEDULE = [0.0, 5.0, 300.0]
DAY = 86400.0


def _decide(attempt=0, status=500, error="HTTP 500", asked=None, enabled=True, failing_since=None,
            schedule=SCHEDULE, disable_after=DAY):
    return decide(attempt, status, error, asked, enabled, failing_since, NOW, schedule, disable_after,
                  jitter=lambda low, high: high)  # the top of the jitter band: a fixed draw


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"status": 200, "error": None}, ("succeeded", None, None)),
    ({"status": 204, "error": None, "attempt": 3}, ("succeeded", None, None)),
    ({"attempt": 0}, ("pending", 0.0, None)),
    ({"attempt": 1}, ("pending", 6.0, None)),  # 5 s, give or take a fifth: here the top of it
    ({"attempt": 2, "status": None, "error": "timed out"}, ("pending", 360.0, None)),
    ({"attempt": 1, "asked": 42.0}, ("pending", 42.0, None)),  # the receiver's Retry-After wins
    ({"attempt": 3}, ("failed", None, None)),  # past the end of the schedule
    ({"status": 410, "error": "HTTP 410"}, ("failed", None, "the endpoint answered 410 Gone")),
    ({"status": 410, "error": "HTTP 410", "enabled": False}, ("failed", None, "the endpoint answered 410 Gone")),
    ({"enabled": False}, ("failed", None, None)),  # a disabled endpoint gets nothing more
    ({"failing_since": NOW - timedelta(hours=1)}, ("pending", 0.0, None)),
    ({"failing_since": NOW - timedelta(days=2)},
     ("pending", 0.0, "every delivery failed since 2026-12-01T12:00:00Z")),
    ({"attempt": 3, "failing_since": NOW - timedelta(days=2)},
     ("failed", None, "every delivery failed since 2026-12-01T12:00:00Z")),
], ids=["2xx", "2xx-late", "first-retry", "jittered", "timeout", "retry-after", "exhausted", "gone",
        "gone-while-disabled", "disabled", "failing-an-hour", "failing-two-days", "exhausted-and-failing"])
def test_the_retry_and_disable_policy(kwargs, expected):
    assert _decide(**kwargs) == expected


def test_jitter_spreads_a_retry_within_a_fifth_of_its_step():
    draws = {decide(1, 500, "HTTP 500", None, True, None, NOW, SCHEDULE, DAY)[1] for _ in range(200)}
    assert all(4.0 <= d <= 6.0 for d in draws) and len(draws) > 100
