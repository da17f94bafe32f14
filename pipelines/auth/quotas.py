"""Per-key quotas: what one key (or user) may hold at once, so that no caller takes more than its
share of the workers or the disk.

- exports queued or running: `max_exports_per_key` (a runtime setting, 3 by default);
- bytes of finished export files not yet expired: `INGOT_MAX_EXPORT_BYTES_PER_KEY` (20 GiB);
- scenario runs queued or running: `INGOT_MAX_SCENARIO_RUNS_PER_KEY` (10,000).

Past one, the caller gets 429 `QUOTA_EXCEEDED` saying what is used and what is allowed. Scenario runs
start on the API's hot path, in one statement: counting a key's runs there on every start would cost
a scan of all of them, so each API process keeps the last count for a second and counts again, exactly,
only once it comes within a tenth of the quota (or the second is up).
"""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.orm import Session

from pipelines.core import runtime
from pipelines.core.errors import OverQuota
from pipelines.core.models import ACTIVE_STATES
from pipelines.core.settings import get_settings


class QuotaExceeded(OverQuota):
    def __init__(self, what: str, used: int, allowed: int, retry_after: int | None = None):
        super().__init__(f"this key's quota of {what} is used up ({used:,} of {allowed:,})",
                         {"quota": what, "used": used, "allowed": allowed}, retry_after)


_ACTIVE = [str(s) for s in ACTIVE_STATES]

_EXPORTS = text("""
SELECT count(*) FILTER (WHERE state = ANY(:active)) AS active,
       COALESCE(sum((result->>'file_size')::bigint) FILTER (WHERE state = 'succeeded'
                                                             AND NOT result ? 'expired_at'), 0) AS bytes,
       extract(epoch FROM min((result->>'expires_at')::timestamptz - now())
                     FILTER (WHERE state = 'succeeded' AND NOT result ? 'expired_at'))::int AS frees_in
FROM jobs WHERE kind = 'export' AND api_key_id = :key
""")


def check_exports(session: Session, api_key_id: str) -> None:
    """QuotaExceeded if API_KEY_ID may not start another export now."""
    row = session.execute(_EXPORTS, {"key": api_key_id, "active": _ACTIVE}).one()
    most = runtime.value("max_exports_per_key")
    if row.active >= most:
        raise QuotaExceeded("exports queued or running", row.active, most, retry_after=10)
    allowed = get_settings().max_export_bytes_per_key
    if row.bytes >= allowed:
        frees = max(1, row.frees_in) if row.frees_in is not None else None
        raise QuotaExceeded("bytes of export files kept", int(row.bytes), allowed, retry_after=frees)


_RUNS = ("SELECT count(*) FROM (SELECT 1 FROM jobs WHERE api_key_id = %s AND kind = 'scenario_run' "
         "AND state = ANY(%s) LIMIT %s) AS held")
_counted: dict[str, tuple[int, float]] = {}  # key -> (runs queued or running at the last count, when)
RECOUNT_SECONDS = 1.0


async def check_scenario_runs(api_key_id: str) -> None:
    """QuotaExceeded if API_KEY_ID may not queue another scenario run now (see the module's note)."""
    from pipelines.core import adb

    allowed = get_settings().max_scenario_runs_per_key
    held, at = _counted.get(api_key_id, (0, 0.0))
    if time.monotonic() - at > RECOUNT_SECONDS or held + 1 > allowed * 0.9:
        row = await adb.fetch_one(_RUNS, (api_key_id, _ACTIVE, allowed))
        held = int(row["count"]) if row else 0
        if len(_counted) > 10_000:
            _counted.clear()
        _counted[api_key_id] = (held, time.monotonic())
    if held >= allowed:
        raise QuotaExceeded("scenario runs queued or running", held, allowed, retry_after=5)
    _counted[api_key_id] = (held + 1, _counted[api_key_id][1])  # this start, until the next count
