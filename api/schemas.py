"""Response and request models: what the OpenAPI document shows and the routes return."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.envelope import JSON_INTEGER, UTCDateTime
from pipelines.core.models import Job


class JobOut(BaseModel):
    id: str
    kind: str
    state: str
    progress: int
    records_processed: int
    records_failed: int
    params: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    request_id: str | None
    celery_task_id: str | None
    attempts: int
    sources: list[str]

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls.model_validate(job, from_attributes=True)


class JobList(BaseModel):
    jobs: list[JobOut]


class IngestionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: Annotated[int, Field(ge=1, le=1_000_000), JSON_INTEGER] | None = None
    timeout: Annotated[int, Field(ge=1, le=7 * 24 * 3600, description="job timeout in seconds"),
                       JSON_INTEGER] | None = None
    mode: Literal["incremental", "full"] = "incremental"
    force: bool = Field(default=False, description="read every file again, even those unchanged since their "
                                                    "last whole load (which are otherwise skipped)")


class StartIngestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[str] | None = Field(default=None, max_length=1000)
    options: IngestionOptions = Field(default_factory=IngestionOptions)


class IngestionStarted(BaseModel):
    job_id: str
    status: str
    sources: list[str]


class StopIngestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = None


class IngestionStopped(BaseModel):
    status: str
    stopped_at: UTCDateTime
    jobs: list[str]


class CurrentJob(BaseModel):
    id: str
    started_at: UTCDateTime | None
    progress: int
    records_processed: int
    errors: int


class LastCompleted(BaseModel):
    id: str
    completed_at: UTCDateTime | None
    records_processed: int
    duration: float | None
    state: str


class IngestionStatus(BaseModel):
    is_running: bool
    current_job: CurrentJob | None
    last_completed: LastCompleted | None


class QuarantineOut(BaseModel):
    id: int
    source: str
    job_id: str | None
    file: str | None
    line: int | None
    reason: str
    raw: dict[str, Any]
    created_at: UTCDateTime
    last_seen_job_id: str | None
    times_seen: int
    resolved_at: UTCDateTime | None
    resolved_by_job_id: str | None


class QuarantineList(BaseModel):
    rows: list[QuarantineOut]


class SourceSummary(BaseModel):
    id: str
    name: str
    type: str | None
    enabled: bool
    last_sync: UTCDateTime | None
    status: str


class SourceList(BaseModel):
    sources: list[SourceSummary]


class SyncStats(BaseModel):
    total_records: int  # counted to 100,000: at least this many when total_records_exact is false
    total_records_exact: bool = True
    successful: int
    failed: int
    skipped: int = 0  # scheduled ticks that found a run of the source still active
    last_error: str | None
    last_sync: UTCDateTime | None


class SourceDetail(SourceSummary):
    config: dict[str, Any]
    validation: dict[str, Any]
    schedule: str | None
    next_run_at: UTCDateTime | None = None  # when the schedule fires next (beat's own rule); None unscheduled
    last_scheduled_at: UTCDateTime | None = None  # when it last fired, a run queued or skipped
    sync_stats: SyncStats
    error: str | None = None


class SampleRecord(BaseModel):
    id: str
    timestamp: UTCDateTime | None
    value: float | None
    metadata: dict[str, Any]


class SourceTest(BaseModel):
    connected: bool
    sample_data: list[SampleRecord]
    sample_rejects: list[dict[str, Any]]
    total_records: int | None
    error: str | None
