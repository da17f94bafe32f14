"""Exports: start one, watch it, download the file (resumable with HTTP ranges)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, field_validator

from api.deps import Reader, SessionDep, Writer, limit
from api.envelope import Envelope, found, iso, ok
from api.routes.data import Filters
from pipelines.auth.principal import Principal
from pipelines.core.models import Job
from pipelines.exports import admission, export
from worker.dispatch import send_job

router = APIRouter(prefix="/data/export", tags=["exports"])


class ExportRequest(BaseModel):
    model_config = {"extra": "forbid"}

    format: Literal["csv", "parquet", "jsonl"]
    filters: Filters = Field(default_factory=Filters)
    columns: list[Literal["id", "source", "timestamp", "value", "metadata", "job_id", "ingested_at"]] | None = Field(
        default=None, min_length=1, max_length=7, json_schema_extra={"uniqueItems": True},
        description="the file's columns, in this order, each once")

    @field_validator("columns")
    @classmethod
    def _each_once(cls, columns: list[str] | None) -> list[str] | None:
        twice = sorted({c for c in columns or [] if columns.count(c) > 1})  # type: ignore[union-attr]
        if twice:
            raise ValueError(f"each column once: {', '.join(twice)} given more than once")
        return columns


class ExportStarted(BaseModel):
    export_id: str
    status: str
    download_url: str


class ExportStatus(BaseModel):
    export_id: str
    status: str
    progress: int
    row_count: int | None
    file_size: int | None
    checksum: str | None
    format: str
    download_url: str
    expires_at: str | None
    error: str | None


def _download_url(request: Request, job_id: str) -> str:
    return str(request.url_for("download_export", export_id=job_id))


def _export_job(session, export_id: str, caller: Principal) -> Job:
    return found(admission.find(session, export_id, caller.owner), f"no export '{export_id}'")


@router.post("", status_code=202, response_model=Envelope[ExportStarted],
             dependencies=[limit("export", "export_rate_limit_per_minute")])
def start_export(body: ExportRequest, request: Request, session: SessionDep, caller: Writer) -> dict:
    params = {"format": body.format, "filters": body.filters.model_dump(mode="json", exclude_none=True),
              "columns": body.columns or export.DEFAULT_COLUMNS}
    job = admission.start(session, params, caller.id, send_job, request.state.request_id)
    return ok(request, {"export_id": job.id, "status": job.state, "download_url": _download_url(request, job.id)},
              message="export queued")


@router.get("/{export_id}", response_model=Envelope[ExportStatus])
def export_status(export_id: str, request: Request, session: SessionDep, caller: Reader) -> dict:
    job = _export_job(session, export_id, caller)
    result = job.result or {}
    return ok(request, {
        "export_id": job.id, "status": admission.status(job), "progress": job.progress,
        "row_count": result.get("row_count", job.records_processed), "file_size": result.get("file_size"),
        "checksum": result.get("checksum"), "format": job.params["format"],
        "download_url": _download_url(request, job.id), "expires_at": iso(_parsed(result.get("expires_at"))),
        "error": job.error,
    })


def _parsed(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@router.get("/{export_id}/download", name="download_export",
            responses={200: {"content": {t: {} for t, _ in export.FORMATS.values()}}})
def download(export_id: str, session: SessionDep, caller: Reader) -> FileResponse:
    """The file, streamed; `Range` requests resume large downloads. 409 before it is ready, 404 once
    it has expired."""
    file = admission.download(_export_job(session, export_id, caller))
    return FileResponse(file.path, media_type=file.media_type, filename=file.filename,
                        headers={"X-Checksum-SHA256": file.checksum})
