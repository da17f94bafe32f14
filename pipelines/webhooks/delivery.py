"""One signed delivery attempt, recorded, and the retry schedule after it.

Bodies are signed per Standard Webhooks, with a `webhook-id` that stays the same across retries and
redeliveries so receivers can de-duplicate, and each carries the event's timestamp so receivers can
order deliveries that arrive concurrently. An endpoint failing for longer than
`INGOT_WEBHOOK_DISABLE_AFTER_SECONDS`, or answering 410 Gone, is disabled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import httpcore
import httpx
import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, OperationalError
from standardwebhooks import Webhook as Signer

from pipelines.core import httpclock, netguard, runtime
from pipelines.core.clock import utc_z
from pipelines.core.db import get_engine, transaction
from pipelines.core.retry import retry_after
from pipelines.core.settings import get_settings
from pipelines.jobs import journal
from pipelines.webhooks import relay
from pipelines.webhooks.endpoints import decrypt

log = logging.getLogger(__name__)

EXCERPT_CHARS = 1000
EXCERPT_BYTES = 4 * EXCERPT_CHARS  # enough for EXCERPT_CHARS characters of UTF-8
RETRY_AFTER_CAP = 24 * 3600  # a receiver may ask for a day's pause, no more


@lru_cache(maxsize=1024)
def _signer(secret_encrypted: str) -> Signer:
    return Signer(decrypt(secret_encrypted))


def body_of(event) -> str:
    return json.dumps({"type": event.type, "timestamp": utc_z(event.created_at), "data": event.payload},
                      separators=(",", ":"))


def new_pool(connections: int) -> httpcore.ConnectionPool:
    """The connection pool deliveries share within a process. httpcore rather than httpx.Client: a
    delivery needs none of a client's conveniences (redirects are never followed, cookies never kept,
    the address is already resolved and checked), and without them a request costs 40% less CPU."""
    return httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), max_connections=connections,
                                   max_keepalive_connections=connections, network_backend=httpclock.DeadlineBackend())


def _post(pool: httpcore.ConnectionPool, url: str, address: str, body: str, headers: dict, timeout: float
          ) -> tuple[httpx.Response, str]:
    """POST to the checked ADDRESS, presenting URL's host (Host header and TLS name) to the server.

    The answer is streamed and dropped after a short excerpt, never decompressed, and read for no
    longer than TIMEOUT in all: a receiver cannot hand back a gzip bomb or trickle bytes forever.
    Returns the answer (status and headers) and the excerpt."""
    with httpclock.within(timeout) as deadline:
        return _post_by(pool, url, address, body, headers, timeout, deadline)


def _post_by(pool: httpcore.ConnectionPool, url: str, address: str, body: str, headers: dict, timeout: float,
             deadline: float) -> tuple[httpx.Response, str]:
    target = httpx.URL(url)
    pinned = target.copy_with(host=address)
    extensions: dict = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    host_header = target.host if target.port is None else f"{target.host}:{target.port}"
    content = body.encode()
    request_headers = [*headers.items(), ("Host", host_header), ("Accept-Encoding", "identity"),
                       ("Content-Length", str(len(content)))]
    with pool.stream("POST", httpcore.URL(scheme=pinned.raw_scheme, host=pinned.raw_host, port=pinned.port,
                                          target=pinned.raw_path),
                     headers=request_headers, content=content, extensions=extensions) as answer:
        response = httpx.Response(answer.status, headers=answer.headers)
        return response, _excerpt(response.headers, answer.iter_stream(), deadline)


def _excerpt(headers: httpx.Headers, chunks, deadline: float) -> str:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return f"({encoding}-encoded answer, not decoded)"
    kept = bytearray()
    try:
        for chunk in chunks:  # each piece as it arrives, so the deadline is looked at between them
            kept += chunk
            if len(kept) >= EXCERPT_BYTES or time.monotonic() > deadline:
                break
    except httpcore.TimeoutException:  # the attempt's deadline came in the middle of the body: its answer stands
        pass
    return kept[:EXCERPT_BYTES].decode("utf-8", "replace")[:EXCERPT_CHARS]


@dataclass
class Outcome:
    """What one attempt came to."""

    attempt: int
    status: int | None = None  # the HTTP status, when an answer came
    error: str | None = None  # None: delivered
    excerpt: str | None = None  # the start of the answer's body
    duration_ms: float = 0.0
    response: httpx.Response | None = None


def deliver(delivery_ids: list[str], pool: httpcore.ConnectionPool, concurrency: int = 1,
            hand_off: float | None = None) -> dict[str, str]:
    """Make one attempt at each of DELIVERY_IDS, CONCURRENCY at a time; returns each delivery's state
    afterwards (`missing` for one this task did not get, `sending` for one handed off).

    Each delivery is held by a session-level advisory lock from before its request until its record
    commits, so a delivery handed out twice (its claim ran out, a message came back) is attempted by one
    task only: the other skips it. Each answer is recorded the moment it is in (with any others that
    came in meanwhile, in one short transaction). Should the database go away meanwhile, the answers
    already in are kept and recorded when it is back, while the deliveries' claim still holds, so a
    receiver that answered is not sent the same event again.

    With HAND_OFF (seconds), the attempts run on the process's own threads (`threads`), and what is
    still unanswered after HAND_OFF is left to them: a thread of the process records those answers as
    they come and then lets the locks go, while the task returns and its process takes the next batch.
    A receiver that hangs thus holds a thread, never a worker process and the batches behind it. A batch
    whose endpoints have yet to prove they answer (the relay sends those apart) goes to the threads at
    once."""
    ids = list(dict.fromkeys(delivery_ids))
    states = dict.fromkeys(ids, "missing")
    locks = _Locks()
    handed_off = False
    own = None if hand_off is not None else ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="webhook")
    try:
        rows = locks.take(ids)
        states.update({row.id: row.state for row in rows})
        if hand_off is not None and rows and all(row.unsettled for row in rows):
            hand_off = 0.0  # endpoints yet to prove they answer (new, failing, paused) hold no worker process
        executor = own or threads(concurrency)
        queued = deque(row for row in rows if row.state == "pending")
        waiting: dict = {}

        def top_up(most: int) -> None:  # CONCURRENCY at a time from this batch, as before a hand-off
            while queued and len(waiting) < most:
                row = queued.popleft()
                waiting[executor.submit(_timed_attempt, row, pool)] = row

        top_up(max(1, concurrency))
        give_up_at = None if hand_off is None else time.monotonic() + hand_off
        while waiting:
            left = None if give_up_at is None else max(0.0, give_up_at - time.monotonic())
            done, _ = wait(waiting, timeout=left, return_when=FIRST_COMPLETED)
            if not done:
                break
            states.update(locks.record([(waiting.pop(future), future.result()) for future in done]))
            top_up(max(1, concurrency))
        if waiting:
            top_up(len(waiting) + len(queued))  # the rest need not queue behind a receiver that hangs
            states.update(dict.fromkeys((row.id for row in waiting.values()), "sending"))
            threading.Thread(target=_record_later, args=(locks, waiting), name="webhook-hand-off",
                             daemon=True).start()
            handed_off = True
    finally:
        if own is not None:
            own.shutdown(wait=True)
        if not handed_off:
            locks.release()
    return states


_threads: dict[int, ThreadPoolExecutor] = {}
_threads_lock = threading.Lock()


def threads(concurrency: int) -> ThreadPoolExecutor:
    """This process's threads for attempts (made after the fork): four times CONCURRENCY, so that a
    few receivers that hang cannot take them all."""
    with _threads_lock:
        executor = _threads.get(os.getpid())
        if executor is None:
            executor = _threads[os.getpid()] = ThreadPoolExecutor(max(1, concurrency) * 4,
                                                                  thread_name_prefix="webhook")
        return executor


def _record_later(locks: _Locks, waiting: dict) -> None:
    """Record the handed-off attempts as they end, then let their locks go."""
    try:
        while waiting:
            done, _ = wait(waiting, return_when=FIRST_COMPLETED)
            locks.record([(waiting.pop(future), future.result()) for future in done])
    except Exception:  # their claims run out and the relay hands them out again
        log.exception("could not record handed-off webhook attempts")
    finally:
        locks.release()


BUSY_RECHECK_SECONDS = 3.0  # a delivery found locked by another task is handed out again after this


class _Locks:
    """A connection holding the advisory locks of the deliveries a task is sending, and recording their
    answers; if the database goes away, a new connection takes the locks again to record them."""

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.held: set[str] = set()
        self.deadline = 0.0  # monotonic: when the relay may hand these deliveries out again

    def _lock(self, ids: list[str]) -> list[str]:
        # In autocommit: each statement is its own transaction, with no BEGIN and COMMIT round trips
        # around it; the few writes that must go together say so (see `_record`).
        self.connection = get_engine().connect().execution_options(isolation_level="AUTOCOMMIT")
        return list(self.connection.execute(text(
            "SELECT id FROM unnest(CAST(:ids AS text[])) AS id "
            "WHERE pg_try_advisory_lock(hashtext('ingot.delivery'), hashtext(id))"
        ), {"ids": ids}).scalars())

    def take(self, ids: list[str]) -> list[Any]:
        self.held = set(self._lock(ids))
        assert self.connection is not None
        rows = list(self.connection.execute(text(
            "SELECT d.id, d.attempts, d.state, w.id AS webhook_id, w.url, "
            "w.enabled AND NOT ingot_owner_gone(w.api_key_id) AS enabled, w.secret_encrypted, "
            "w.failing_since, NOT ingot_endpoint_proven(w) AS unsettled, "
            "e.id AS event_id, e.type, e.payload, e.created_at, "
            "extract(epoch FROM d.claimed_until - now()) AS claim_left, d.claimed_until "
            "FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id "
            "JOIN webhook_events e ON e.id = d.event_id WHERE d.id = ANY(:ids) ORDER BY e.created_at"
        ), {"ids": list(self.held)}))
        busy = sorted(set(ids) - self.held)
        if busy:
            # Held by another task still: one that is sending them now, or one whose host vanished, whose
            # locks go only when the server drops its session. Looked at again in a few seconds rather
            # than a whole claim from now, so a vanished host's deliveries go out soon after it is dropped.
            self.connection.execute(text(
                "UPDATE webhook_deliveries SET claimed_until = least(claimed_until, now() + make_interval(secs => :s)) "
                "WHERE id = ANY(:ids) AND state = 'pending' AND next_attempt_at IS NULL"
            ), {"ids": busy, "s": BUSY_RECHECK_SECONDS})
        # Read by a statement after the locks are held: a record committed before them is seen.
        left = min((float(r.claim_left) for r in rows if r.claim_left is not None),
                   default=get_settings().webhook_claim_seconds)
        self.deadline = time.monotonic() + left - 1.0
        return rows

    def record(self, answered: list[tuple]) -> dict[str, str]:
        delay = 0.1
        while True:
            try:
                if self.connection is None:  # the database went away: take the locks again
                    self.held &= set(self._lock(sorted(self.held)))
                assert self.connection is not None
                mine = [(row, outcome) for row, outcome in answered if row.id in self.held]
                states = _record(self.connection, [r for r, _ in mine], [o for _, o in mine])
                break
            except (DBAPIError, psycopg.OperationalError) as exc:  # psycopg's: from a COMMIT (db.transaction)
                if isinstance(exc, DBAPIError) and not (exc.connection_invalidated
                                                        or isinstance(exc, OperationalError)):
                    raise
                self._drop()
                if time.monotonic() + delay > self.deadline:
                    log.error("could not record %s answered webhook deliveries before their claim ran out; "
                              "they will be sent again", len(answered))
                    raise
                log.warning("the database went away while recording webhook answers; trying again")
                time.sleep(delay)  # a back-off while the database is away
                delay = min(delay * 2, 2.0)
        for row, _ in answered:
            if row.id not in self.held:
                log.warning("webhook delivery %s was answered, but another task holds it now; "
                            "its attempt is not recorded here", row.id)
        return states

    def _drop(self) -> None:
        if self.connection is not None:
            self.connection.invalidate()  # closed, not pooled: its advisory locks go with it
            self.connection.close()
            self.connection = None

    def release(self) -> None:
        if self.connection is None:
            return
        try:
            self.connection.execute(text("SELECT pg_advisory_unlock_all()"))
            self.connection.close()
            self.connection = None
        except DBAPIError:
            self._drop()


def _timed_attempt(row, pool: httpcore.ConnectionPool) -> Outcome:
    began = time.perf_counter()
    try:
        outcome = _attempt(row, pool) if row.enabled else Outcome(row.attempts + 1, error="endpoint disabled")
    except Exception as exc:  # a fault of ours with one delivery: retried on schedule, its batch goes on
        log.exception("webhook delivery %s failed in Ingot", row.id)
        outcome = Outcome(row.attempts + 1, error=f"internal error ({type(exc).__name__})")
    outcome.duration_ms = round((time.perf_counter() - began) * 1000, 1)
    return outcome


def _attempt(row, pool: httpcore.ConnectionPool) -> Outcome:
    settings = get_settings()
    outcome = Outcome(row.attempts + 1)
    try:
        address = netguard.resolve(row.url, settings.webhook_allow_private)
        body = body_of(row)
        now = datetime.now(UTC)
        signature = _signer(row.secret_encrypted).sign(row.event_id, now, body)
        headers = {"webhook-id": row.event_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signature, "Content-Type": "application/json",
                   "User-Agent": "Ingot-Webhooks/1"}
        response, outcome.excerpt = _post(pool, row.url, address, body, headers, settings.webhook_timeout_seconds)
        outcome.response, outcome.status = response, response.status_code
        if not response.is_success:
            outcome.error = f"HTTP {response.status_code}"
    except netguard.UnsafeUrl as exc:
        outcome.error = f"refused: {exc}"
    except httpcore.TimeoutException:
        outcome.error = f"no answer within {settings.webhook_timeout_seconds:g} s"
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:500]
    return outcome


def decide(attempt: int, status: int | None, error: str | None, asked_delay: float | None, enabled: bool,
           failing_since: datetime | None, now: datetime, schedule: list[float], disable_after: float,
           jitter=random.uniform) -> tuple[str, float | None, str | None]:
    """The retry and disable policy for one attempt (ATTEMPT of a delivery, 0 the first): the delivery's
    next state (succeeded, pending or failed), seconds until its next attempt when pending, and why its
    endpoint is disabled now, if it is.

    - An answer of 2xx delivers it. 410 Gone fails it and disables the endpoint; so does failing ever
      since FAILING_SINCE for longer than DISABLE_AFTER seconds. A disabled endpoint's delivery fails.
    - Otherwise it is tried again after SCHEDULE[attempt] seconds, give or take a fifth (retries of many
      events spread out), or after the receiver's Retry-After (ASKED_DELAY) when it sent one; past the
      end of the schedule it has failed."""
    if error is None:
        return "succeeded", None, None
    if status == 410:
        return "failed", None, "the endpoint answered 410 Gone"
    if not enabled:
        return "failed", None, None
    since = failing_since or now
    disable = (f"every delivery failed since {utc_z(since)}"
               if (now - since).total_seconds() > disable_after else None)
    if attempt >= len(schedule):
        return "failed", None, disable
    return "pending", asked_delay if asked_delay is not None else schedule[attempt] * jitter(0.8, 1.2), disable


def _record(connection: Connection, rows: list, outcomes: list[Outcome]) -> dict[str, str]:
    """Record each attempt and decide what follows: delivered, retried later, failed, or the endpoint
    disabled. The attempts and their deliveries are one statement however many, on its own when no
    endpoint changes (the usual answer: a 2xx from an endpoint that answered before); otherwise in one
    transaction with each endpoint touched, updated once, in id order, so two tasks never wait on each
    other's endpoints in opposite orders."""
    settings = get_settings()
    schedule = runtime.retry_schedule()
    now = datetime.now(UTC)
    states: dict[str, str] = {}
    writes = []
    endpoints: dict[str, tuple[bool, str | None]] = {}  # webhook id -> (failing now, reason to disable)
    failures: dict[str, int] = {}  # webhook id -> failed attempts in this batch
    handed_out: dict[str, datetime] = {}  # webhook id -> when the latest of its failed attempts was handed out
    claim = timedelta(seconds=settings.webhook_claim_seconds)  # a hand-out claims a delivery this long
    for row, outcome in zip(rows, outcomes, strict=True):
        attempt, status, error = outcome.attempt, outcome.status, outcome.error
        state, delay, disable = decide(attempt, status, error, retry_after(outcome.response, RETRY_AFTER_CAP),
                                       row.enabled, row.failing_since, now, schedule,
                                       settings.webhook_disable_after_seconds)
        next_at = None if delay is None else now + timedelta(seconds=delay)
        if row.enabled:
            before = endpoints.get(row.webhook_id, (True, None))
            # One success in the batch says the endpoint answers: it is not failing.
            endpoints[row.webhook_id] = (before[0] and error is not None, disable or before[1])
            failures[row.webhook_id] = failures.get(row.webhook_id, 0) + (error is not None)
            if error is not None and row.claimed_until is not None:
                at = row.claimed_until - claim
                handed_out[row.webhook_id] = max(handed_out.get(row.webhook_id, at), at)
        if error:
            log.info("webhook delivery %s attempt %s failed: %s", row.id, attempt, error)
        states[row.id] = state
        writes.append({"d": row.id, "a": attempt, "state": state, "s": status, "ms": outcome.duration_ms,
                       "e": error, "x": outcome.excerpt, "n": next_at})
    if not writes:
        return states
    answers = {key: [w[key] for w in writes] for key in ("d", "a", "state", "s", "ms", "e", "x", "n")}
    endpoint_rows = {row.webhook_id: row for row in rows}
    changes = []  # most answers change nothing on their endpoint (it answers, and answered before)
    for webhook_id in sorted(endpoints):
        failing, disable = endpoints[webhook_id]
        unsettled = endpoint_rows[webhook_id].unsettled  # yet to prove it answers
        if failing or disable or unsettled:
            changes.append((webhook_id, failing, disable, unsettled))
    if not changes:  # one statement, its own transaction (CONNECTION is in autocommit)
        connection.execute(_RECORD, answers)
        return states
    with transaction(connection):  # the attempts and their endpoints
        connection.execute(_RECORD, answers)
        # An endpoint yet to prove it answers has one or two in flight: its next may go out now.
        connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": relay.CHANNEL})
        for webhook_id, failing, disable, unsettled in changes:
            if failing:
                _failed(connection, webhook_id, failures[webhook_id], handed_out.get(webhook_id), settings)
            elif unsettled:
                _answered(connection, webhook_id)
            if disable:
                _disable(connection, webhook_id, disable)
    return states


# Each attempt of a batch recorded, and its delivery settled or given its next time, in one statement.
_RECORD = text("""
WITH answered AS (
    SELECT * FROM unnest(CAST(:d AS text[]), CAST(:a AS integer[]), CAST(:state AS text[]), CAST(:s AS integer[]),
                         CAST(:ms AS double precision[]), CAST(:e AS text[]), CAST(:x AS text[]),
                         CAST(:n AS timestamptz[])) AS t(d, a, state, s, ms, e, x, n)
), attempts AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, duration_ms, error, response_excerpt,
                                  next_retry_at)
    SELECT d, a, now(), s, ms, e, x, n FROM answered
)
UPDATE webhook_deliveries SET attempts = answered.a, state = answered.state, next_attempt_at = answered.n,
    claimed_until = NULL, last_status_code = answered.s, last_error = answered.e,
    completed_at = CASE WHEN answered.state = 'pending' THEN NULL ELSE now() END
FROM answered WHERE webhook_deliveries.id = answered.d
""")


# The circuit breaker. An endpoint whose attempts fail (an error status, a timeout, a refused
# connection) `webhook_pause_after_failures` times in a row is paused: the relay hands it nothing but
# a single probe, after `webhook_probe_seconds`, then twice as long after each failed probe, up to an
# hour. The first answer that succeeds resumes it. Its deliveries keep their place meanwhile. A failure
# recorded while paused is a failed probe only if its delivery was handed out after the pause: the
# attempts already in flight when it paused (a whole batch, to an endpoint that answered before) fail
# too, and counting each as a probe doubled the wait again and again, to minutes after the endpoint
# was back (`make faults`: its receiver's row waited past 90 s).
MOST_PROBE_SECONDS = 3600.0

_FAILED = text("""
UPDATE webhooks SET
    failing_since = COALESCE(failing_since, now()),
    consecutive_failures = consecutive_failures + :n,
    probes = CASE WHEN paused_at IS NULL THEN 0 WHEN :handed_out >= paused_at THEN probes + 1 ELSE probes END,
    probe_at = CASE
        WHEN paused_at IS NULL THEN CASE WHEN consecutive_failures + :n >= :threshold
                                         THEN now() + make_interval(secs => :base) ELSE probe_at END
        WHEN :handed_out >= paused_at THEN now() + make_interval(secs => least(:base * 2 ^ (probes + 1), :most))
        ELSE probe_at END,
    paused_at = CASE WHEN paused_at IS NULL AND consecutive_failures + :n >= :threshold THEN now() ELSE paused_at END
WHERE id = :w
RETURNING paused_at = now() AS paused_now, consecutive_failures, probe_at
""")

_ANSWERED = text("""
UPDATE webhooks w SET failing_since = NULL, consecutive_failures = 0, paused_at = NULL, probe_at = NULL, probes = 0,
    answered_at = COALESCE(w.answered_at, now())
FROM (SELECT id, paused_at FROM webhooks WHERE id = :w) AS before
WHERE w.id = before.id AND NOT ingot_endpoint_proven(w)
RETURNING before.paused_at
""")


def _failed(connection: Connection, webhook_id: str, failures: int, handed_out: datetime | None,
            settings) -> None:
    """Count FAILURES of WEBHOOK_ID's attempts; HANDED_OUT: when the latest of them was handed out
    (None: unknown, taken as after any pause, so a failure while paused counts as a failed probe)."""
    row = connection.execute(_FAILED, {"w": webhook_id, "n": failures, "base": settings.webhook_probe_seconds,
                                       "most": MOST_PROBE_SECONDS,
                                       "handed_out": handed_out or datetime.max.replace(tzinfo=UTC),
                                       "threshold": settings.webhook_pause_after_failures}).one_or_none()
    if row is not None and row.paused_now:
        journal.record(connection, "webhook.endpoint_paused",
                       f"webhook {webhook_id} paused after {row.consecutive_failures} failed attempts in a row; "
                       f"next probe at {utc_z(row.probe_at)}", level="warning",
                       details={"webhook_id": webhook_id, "failures": row.consecutive_failures})


def _answered(connection: Connection, webhook_id: str) -> None:
    row = connection.execute(_ANSWERED, {"w": webhook_id}).one_or_none()
    if row is not None and row.paused_at is not None:
        journal.record(connection, "webhook.endpoint_resumed", f"webhook {webhook_id} answered a probe: resumed",
                       details={"webhook_id": webhook_id, "paused_at": utc_z(row.paused_at)})


def _disable(connection: Connection, webhook_id: str, reason: str) -> None:
    connection.execute(text(
        "UPDATE webhooks SET enabled = false, disabled_at = now(), disabled_reason = :r WHERE id = :w AND enabled"
    ), {"w": webhook_id, "r": reason})
    log.warning("webhook %s disabled: %s", webhook_id, reason)
