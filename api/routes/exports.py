"""Exports: start one, watch it, download the file (resumable with HTTP ranges)."""

from __future__ import annotations

import re
import shutil
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from api.deps import ReadKey, SessionDep, WriteKey
from api.envelope import ApiError, Envelope, ok
from api.limits import limit
from api.routes.data import Filters
from pipelines import export, jobs, runtime
from pipelines.models import ACTIVE_STATES, Job
from pipelines.settings import get_settings
from worker.dispatch import send_job

router = APIRouter(prefix="/data/export", tags=["exports"])
_JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")


class ExportRequest(BaseModel):
    model_config = {"extra": "forbid"}

    format: Literal["csv", "parquet", "jsonl"]
    filters: Filters = Field(default_factory=Filters)
    columns: list[Literal["id", "source", "timestamp", "value", "metadata", "job_id", "ingested_at"]] | None = Field(
        default=None, min_length=1, max_length=7)


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


def _export_job(session, export_id: str) -> Job:
    job = session.get(Job, export_id) if _JOB_ID.match(export_id) else None
    if job is None or job.kind != "export":
        raise ApiError(404, f"no export '{export_id}'")
    return job


def _status(job: Job) -> str:
    return "expired" if job.state == "succeeded" and "expired_at" in job.result else job.state


@router.post("", status_code=202, response_model=Envelope[ExportStarted],
             dependencies=[limit("export", lambda: runtime.value("export_rate_limit_per_minute"))])
def start_export(body: ExportRequest, request: Request, session: SessionDep, key: WriteKey) -> dict:
    settings = get_settings()
    running = session.scalar(select(func.count()).where(
        Job.kind == "export", Job.state.in_(ACTIVE_STATES), Job.api_key_id == key.id))
    most = runtime.value("max_exports_per_key")
    if running >= most:
        raise ApiError(429, f"this key already has {running} exports queued or running "
                       f"(at most {most}); wait for one to finish",
                       headers={"Retry-After": "10"})
    free = shutil.disk_usage(export.exports_dir()).free
    if free < settings.export_min_free_bytes:
        raise ApiError(503, f"not enough disk space for exports: {free / 2**20:,.0f} MiB free")
    params = {"format": body.format, "filters": body.filters.model_dump(mode="json", exclude_none=True),
              "columns": body.columns or export.DEFAULT_COLUMNS}
    job = jobs.create_job(session, kind="export", queue="export", params=params, send=send_job,
                          request_id=request.state.request_id, api_key_id=key.id)
    session.commit()
    return ok(request, {"export_id": job.id, "status": job.state, "download_url": _download_url(request, job.id)},
              message="export queued")


@router.get("/{export_id}", response_model=Envelope[ExportStatus])
def export_status(export_id: str, request: Request, session: SessionDep, _key: ReadKey) -> dict:
    job = _export_job(session, export_id)
    result = job.result or {}
    return ok(request, {
        "export_id": job.id, "status": _status(job), "progress": job.progress,
        "row_count": result.get("row_count", job.records_processed), "file_size": result.get("file_size"),
        "checksum": result.get("checksum"), "format": job.params["format"],
        "download_url": _download_url(request, job.id), "expires_at": _iso(result.get("expires_at")),
        "error": job.error,
    })


def _iso(value: str | None) -> str | None:
    return value and datetime.fromisoformat(value).isoformat().replace("+00:00", "Z")


@router.get("/{export_id}/download", name="download_export",
            responses={200: {"content": {t: {} for t, _ in export.FORMATS.values()}}})
def download(export_id: str, session: SessionDep, _key: ReadKey) -> FileResponse:
    """The file, streamed; `Range` requests resume large downloads. 409 before it is ready, 404 once
    it has expired."""
    job = _export_job(session, export_id)
    if job.state != "succeeded":
        raise ApiError(409, f"export {job.id} is {job.state}, not ready to download")
    fmt = job.params["format"]
    path = export.final_path(job.id, fmt)  # built from the job row, never from the request
    if "expired_at" in job.result or not path.is_file():
        raise ApiError(404, f"export {job.id} has expired")
    media_type, extension = export.FORMATS[fmt]
    return FileResponse(path, media_type=media_type, filename=f"ingot-export-{job.id}.{extension}",
                        headers={"X-Checksum-SHA256": job.result["checksum"].removeprefix("sha256:")})
