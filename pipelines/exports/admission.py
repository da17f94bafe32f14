"""Whether an export may start now (per-key quotas, free disk), finding one by id, and whether its
file may be downloaded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from pipelines.auth import quotas
from pipelines.core.errors import Conflict, NotFound
from pipelines.core.models import Job, JobKind, JobState
from pipelines.exports.export import FORMATS, DiskFull, check_space, exports_dir, final_path
from pipelines.jobs.machine import Sender, create_job

_EXPORT_ID = re.compile(r"^job_[0-9a-f]{24}$")

__all__ = ["DiskFull", "Download", "start", "find", "status", "download"]


def start(session: Session, params: dict[str, Any], api_key_id: str, send: Sender, request_id: str | None) -> Job:
    """Queue an export for API_KEY_ID: QuotaExceeded past the key's quotas (exports at once, bytes of
    files kept), DiskFull when the exports folder's disk is short of space."""
    quotas.check_exports(session, api_key_id)
    check_space(exports_dir())
    return create_job(session, kind=JobKind.EXPORT, params=params, send=send,
                      request_id=request_id, api_key_id=api_key_id)


def find(session: Session, export_id: str, owner: str | None) -> Job | None:
    """The export job EXPORT_ID, or None (an id of another shape is not looked up; with OWNER, one
    someone else started is not found either)."""
    job = session.get(Job, export_id) if _EXPORT_ID.match(export_id) else None
    if job is None or job.kind != JobKind.EXPORT or (owner is not None and job.api_key_id != owner):
        return None
    return job


def status(job: Job) -> str:
    """The job's state, or `expired` once its file has been removed."""
    return "expired" if job.state == JobState.SUCCEEDED and "expired_at" in job.result else job.state


@dataclass(frozen=True)
class Download:
    path: Path
    media_type: str
    filename: str
    checksum: str  # SHA-256, hex


def download(job: Job) -> Download:
    """What to send for JOB's file: Conflict before it is ready, NotFound once it has expired."""
    if job.state != JobState.SUCCEEDED:
        raise Conflict(f"export {job.id} is {job.state}, not ready to download")
    fmt = job.params["format"]
    path = final_path(job.id, fmt)  # built from the job row, never from the request
    if "expired_at" in job.result or not path.is_file():
        raise NotFound(f"export {job.id} has expired")
    media_type, extension = FORMATS[fmt]
    return Download(path, media_type, f"ingot-export-{job.id}.{extension}",
                    job.result["checksum"].removeprefix("sha256:"))
