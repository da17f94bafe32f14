"""The reaper: finds jobs whose message or worker vanished and sends them again, and ends jobs past
their timeout. Run by beat as a safety net; every decision is one guarded UPDATE in
`pipelines.jobs.machine`, so two reapers at once (or a reaper racing a late worker) cannot both act
on a job.

Finding lost messages costs the same whatever the length of the queues. A queue hands its messages
out in the order they were sent, and every message of a kind is numbered by that kind's counter
(`send_seq`). So with SENT messages counted and WAITING still in the broker (asked of the broker by
count, through kombu: any broker), the first SENT - WAITING messages have been handed out. The reaper
marks that number; at its next tick, at least `queued_grace_seconds` later, a job still queued whose
message was numbered within the mark was handed out (or lost with the broker) and never started: a
worker took it and died, or the broker lost it. That job is sent again, with a new number; the old
message, should it ever come back, finds the job taken and does nothing. Per tick that is one count
per queue and a fixed number of statements, whether ten jobs wait or a hundred thousand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import bindparam, text

from pipelines.core.db import session_scope
from pipelines.core.settings import get_settings
from pipelines.jobs import machine
from pipelines.jobs.machine import Sender

log = logging.getLogger(__name__)

# Queued jobs re-sent per kind and tick at the most: after a broker lost a large backlog, the rest go
# at the next ticks.
RESEND_MOST = 5000

_MARKS = text("SELECT kind, handed_out FROM job_queue_marks "
              "WHERE marked_at <= now() - make_interval(secs => :grace) FOR UPDATE")
_MARK = text(
    "INSERT INTO job_queue_marks (kind, handed_out, marked_at) "
    "SELECT k, n, now() FROM unnest(CAST(:kinds AS text[]), CAST(:counts AS bigint[])) AS m(k, n) "
    "ON CONFLICT (kind) DO UPDATE SET handed_out = EXCLUDED.handed_out, marked_at = EXCLUDED.marked_at "
    "WHERE job_queue_marks.marked_at <= now() - make_interval(secs => :grace)"
).bindparams(bindparam("kinds"), bindparam("counts"))

Waiting = Callable[[str], "int | None"]


def reap(send: Sender, waiting: Waiting) -> dict[str, list[str]]:
    """Recover work whose message or worker vanished, and fail work past its timeout.

    WAITING(kind) is how many messages of that kind wait in the broker (None: it cannot say)."""
    report: dict[str, list[str]] = {"timed_out": [], "recovered": [], "resent": [], "given_up": []}
    with session_scope() as session:
        report["timed_out"] = machine.time_out(session)
        report["recovered"], report["given_up"] = machine.requeue_silent(session, send)
        report["resent"] = _resend_handed_out(session, send, waiting)
    for job_id in report["recovered"]:
        log.warning("re-sending job %s: its worker stopped sending heartbeats", job_id)
    for job_id in report["resent"]:
        log.warning("re-sending job %s: its message was handed out or lost, and the job never started", job_id)
    return report


def _resend_handed_out(session, send: Sender, waiting: Waiting) -> list[str]:
    grace = get_settings().queued_grace_seconds
    sent = machine.messages_sent(session.connection())  # before the broker is asked: never too high
    counts = {}
    for kind in sent:
        count = waiting(kind)
        if count is None:  # the broker cannot say: mark nothing, re-send nothing this tick
            return []
        counts[kind] = count
    resent = []
    for kind, handed_out in session.execute(_MARKS, {"grace": grace}).all():
        resent += machine.resend_taken(session, kind, handed_out, RESEND_MOST, send)
    kinds = list(sent)
    session.execute(_MARK, {"kinds": kinds, "counts": [max(sent[k] - counts[k], 0) for k in kinds], "grace": grace})
    return resent
