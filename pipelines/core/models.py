"""SQLAlchemy models: the tables Alembic migrates and the code queries."""

from __future__ import annotations

import enum
import secrets
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class JobKind(enum.StrEnum):
    INGESTION = "ingestion"
    EXPORT = "export"
    SCENARIO_RUN = "scenario_run"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("job"))
    kind: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, default=JobState.QUEUED)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    records_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    records_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    sources: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    request_id: Mapped[str | None] = mapped_column(Text)
    api_key_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Delivery bookkeeping: the message last sent (its number in its kind's count: see
    # pipelines.jobs.machine), and the attempt that holds the job now.
    celery_task_id: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    send_seq: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_id: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[datetime | None]
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    # Where a resumed attempt picks up: committed with every batch.
    checkpoint: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (
        CheckConstraint(
            "state IN ('queued','running','succeeded','failed','cancelling','cancelled')", name="job_state"
        ),
        CheckConstraint("kind IN ('ingestion','export','scenario_run')", name="job_kind"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_kind_state", "kind", "state"),
        Index("ix_jobs_active", "state", postgresql_where="state IN ('queued','running','cancelling')"),
        Index("ix_jobs_waiting", "kind", "send_seq", postgresql_where="state = 'queued'"),
    )


class JobQueueMark(Base):
    """The reaper's mark of one kind's queue: how many of its messages the broker had handed out."""

    __tablename__ = "job_queue_marks"

    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    handed_out: Mapped[int] = mapped_column(BigInteger)
    marked_at: Mapped[datetime]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("key"))
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    # After a rotation, the replaced secret's hash, accepted until previous_valid_until.
    previous_hash: Mapped[str | None] = mapped_column(Text)
    previous_valid_until: Mapped[datetime | None]
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)  # this key's own limit, over its tier's
    tier: Mapped[str] = mapped_column(Text, default="basic", server_default="basic")  # its rate limit's tier


class User(Base):
    """A person who logs in for a short-lived token; the password is kept only as a scrypt hash."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("usr"))
    username: Mapped[str] = mapped_column(Text, unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    disabled_at: Mapped[datetime | None]


class RevokedToken(Base):
    """A bearer token logged out before it expired: refused by every API process until it would have."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(Text, primary_key=True)
    expires_at: Mapped[datetime]


class QuarantineRow(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(Text)
    file: Mapped[str | None] = mapped_column(Text)
    line: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # An entry is one bad row: (source, file, line, raw_hash) is unique (see pipelines.ingestion.quarantine).
    raw_hash: Mapped[str] = mapped_column(Text)
    last_seen_job_id: Mapped[str | None] = mapped_column(Text)
    times_seen: Mapped[int] = mapped_column(Integer, default=1)
    resolved_at: Mapped[datetime | None]
    resolved_by_job_id: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_quarantine_source", "source", "id"),
        Index("ix_quarantine_job", "job_id", "id"),
        Index("uq_quarantine_entry", "source", "file", "line", "raw_hash", unique=True,
              postgresql_nulls_not_distinct=True),
        Index("ix_quarantine_unresolved", "source", "id", postgresql_where=text("resolved_at IS NULL")),
    )


class QuarantineSighting(Base):
    """One run meeting one quarantined row."""

    __tablename__ = "quarantine_sightings"

    job_id: Mapped[str] = mapped_column(Text, primary_key=True)
    quarantine_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("quarantine.id", ondelete="CASCADE"),
                                               primary_key=True, index=True)
    seen_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Observation(Base):
    __tablename__ = "observations"

    # Byte-order collation: keys are identifiers, and C comparisons make the key index cheaper.
    source: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    id: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)  # key: (id, source), below
    timestamp: Mapped[datetime | None]
    value: Mapped[float | None] = mapped_column(Double)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    job_id: Mapped[str | None] = mapped_column(Text)
    ingested_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Key and content hashed by the loader: a re-run merges only rows whose hash is not stored already.
    row_hash: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        # The data query's time order (source and id break ties for cursors). Inside a source's
        # partition the source is constant, so the same index serves queries for one source.
        # The key, id first: a source's partition holds one source, and an index led by a constant
        # column sorts and searches much more slowly than one led by the id.
        PrimaryKeyConstraint("id", "source"),
        Index("ix_observations_time", "timestamp", "source", "id"),
        # The query's other sorts (`pipelines.exports.query`): every order the contract offers is an
        # index scan in either direction, however deep the page.
        Index("ix_observations_value", "value", "source", "id"),
        Index("ix_observations_ingested", "ingested_at", "source", "id"),
        # One partition per source (pipelines/ingestion/partitions.py), created by ingestion.
        {"postgresql_partition_by": "LIST (source)"},
    )


class SourceFile(Base):
    """What one file of a source was when it was last read (`ingestion.sources.fingerprints`)."""

    __tablename__ = "source_files"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(Text)
    declaration: Mapped[str] = mapped_column(Text)
    whole: Mapped[bool]  # every row read, not only those past the cursor
    job_id: Mapped[str | None] = mapped_column(Text)
    loaded_at: Mapped[datetime] = mapped_column(server_default=func.now())


class SourceState(Base):
    """What Ingot knows of each declared source between runs."""

    __tablename__ = "source_state"

    source: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text, default="never_run")
    last_sync: Mapped[datetime | None]
    last_job_id: Mapped[str | None] = mapped_column(Text)
    last_error: Mapped[str | None] = mapped_column(Text)
    successful: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    # Incremental loading: the highest cursor value committed (as text; typed by the source's cursor).
    cursor_value: Mapped[str | None] = mapped_column(Text)
    cursor_ids: Mapped[list[str]] = mapped_column(JSONB, default=list, server_default="[]")
    skipped: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_skipped_at: Mapped[datetime | None]
    last_scheduled_at: Mapped[datetime | None]  # beat's last tick for the source, queued or skipped


class Event(Base):
    """Structured job and system events, kept in the database for /api/v1/logs and the status page."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    level: Mapped[str] = mapped_column(Text, default="info")
    event: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    source: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (
        Index("ix_events_created", "created_at", "id"),
        Index("ix_events_job", "job_id", "id"),
        Index("ix_events_source", "source", "id"),
    )


class Webhook(Base):
    """An endpoint that receives signed job events. The secret is stored encrypted."""

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("wh"))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(ARRAY(Text))
    enabled: Mapped[bool] = mapped_column(default=True)
    secret_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    api_key_id: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    deleted_at: Mapped[datetime | None]
    # The circuit breaker (pipelines.webhooks.delivery): failed attempts in a row; when paused, since
    # when, when its next probe may go, and how many probes failed.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    paused_at: Mapped[datetime | None]
    probe_at: Mapped[datetime | None]
    probes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    answered_at: Mapped[datetime | None]  # its first successful answer


class WebhookEvent(Base):
    """The outbox: written by a trigger in the same transaction as a job's final state."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # the webhook-id receivers de-duplicate on
    type: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    dispatched_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_webhook_events_pending", "created_at", postgresql_where="dispatched_at IS NULL"),)


class WebhookDelivery(Base):
    """One event to one endpoint, through all its attempts."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("dlv"))
    webhook_id: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, default="pending")  # pending | succeeded | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        Index("uq_delivery_event", "webhook_id", "event_id", unique=True),
        Index("ix_deliveries_webhook", "webhook_id", "created_at", "id"),
        # An endpoint's deliveries given a time, and those in flight (migration 0028).
        Index("ix_deliveries_endpoint_due", "webhook_id", "next_attempt_at", "id",
              postgresql_where="state = 'pending' AND next_attempt_at IS NOT NULL"),
        Index("ix_deliveries_in_flight", "webhook_id", "claimed_until",
              postgresql_where="state = 'pending' AND next_attempt_at IS NULL"),
    )


class DeliveryAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    attempted_at: Mapped[datetime] = mapped_column(server_default=func.now())
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_attempts_delivery", "delivery_id", "id"),)


class Curve(Base):
    """One point of a forward curve (the `curves` dataset)."""

    __tablename__ = "curves"

    curve_key: Mapped[str] = mapped_column(Text, primary_key=True)
    asof_date: Mapped[date] = mapped_column(Date, primary_key=True)
    contract_month: Mapped[date] = mapped_column(Date, primary_key=True)
    tenor_label: Mapped[str | None] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Double)
    currency: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str | None] = mapped_column(Text)
    asset_class: Mapped[str | None] = mapped_column(Text)
    iso: Mapped[str | None] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict] = mapped_column("metadata", JSONB, server_default="{}")
    source: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(Text)
    ingested_at: Mapped[datetime] = mapped_column(server_default=func.now())


class CurveIndex(Base):
    """One row per curve: its dimensions and the as-of dates it has (kept with the points)."""

    __tablename__ = "curve_index"

    curve_key: Mapped[str] = mapped_column(Text, primary_key=True)
    asset_class: Mapped[str | None] = mapped_column(Text)
    iso: Mapped[str | None] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(Text)
    currency: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str | None] = mapped_column(Text)
    first_asof: Mapped[date] = mapped_column(Date)
    last_asof: Mapped[date] = mapped_column(Date)


class Scenario(Base):
    __tablename__ = "scenarios"

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=lambda: new_id("scn"))
    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    base: Mapped[dict] = mapped_column(JSONB)
    shocks: Mapped[list] = mapped_column(JSONB)
    api_key_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ScenarioOutput(Base):
    """One curve of a run's outputs: its contract months and their values as parallel arrays."""

    __tablename__ = "scenario_outputs"

    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    scenario_id: Mapped[str] = mapped_column(Text)
    curve_key: Mapped[str] = mapped_column(Text, primary_key=True)
    asof_date: Mapped[date] = mapped_column(Date)
    unit: Mapped[str | None] = mapped_column(Text)
    contract_months: Mapped[list[date]] = mapped_column(ARRAY(Date))
    tenor_labels: Mapped[list[str | None]] = mapped_column(ARRAY(Text))
    base: Mapped[list[float]] = mapped_column(ARRAY(Double))
    shocked: Mapped[list[float]] = mapped_column(ARRAY(Double))
    change: Mapped[list[float]] = mapped_column(ARRAY(Double))


class ScenarioMetric(Base):
    __tablename__ = "scenario_metrics"

    run_id: Mapped[str] = mapped_column(Text, primary_key=True)
    scenario_id: Mapped[str] = mapped_column(Text)
    curve_key: Mapped[str | None] = mapped_column(Text, primary_key=True)  # NULL: over all curves
    mean_change: Mapped[float | None] = mapped_column(Double)
    max_abs_change: Mapped[float | None] = mapped_column(Double)
    mean_pct_change: Mapped[float | None] = mapped_column(Double)
    value_weighted_change: Mapped[float | None] = mapped_column(Double)
