"""Starting ingestion, its status, and the rows it set aside."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request

from api.deps import Reader, SessionDep, Writer
from api.envelope import Cursor, Envelope, ok
from api.registry import registry_or_error
from api.schemas import (
    IngestionStarted,
    IngestionStatus,
    IngestionStopped,
    QuarantineList,
    StartIngestion,
    StopIngestion,
)
from pipelines.ingestion import catalog, quarantine
from pipelines.jobs import control, listing
from worker.dispatch import relay_webhooks, revoke, send_job

router = APIRouter(prefix="/ingestion", tags=["ingestion"])


@router.post("/start", status_code=202, response_model=Envelope[IngestionStarted])
def start(
    request: Request,
    session: SessionDep,
    caller: Writer,
    body: Annotated[StartIngestion | None, Body()] = None,
) -> dict:
    body = body or StartIngestion()
    requested = catalog.resolve(registry_or_error(), body.sources)
    job = control.start_ingestion(
        session,
        requested,
        body.options.model_dump(exclude_none=True),
        send=send_job,
        request_id=request.state.request_id,
        api_key_id=caller.id,
        timeout_seconds=body.options.timeout,
    )
    return ok(request, {"job_id": job.id, "status": job.state, "sources": requested},
              message="ingestion job queued")


@router.post("/stop", response_model=Envelope[IngestionStopped])
def stop(
    request: Request,
    session: SessionDep,
    _caller: Writer,
    body: Annotated[StopIngestion | None, Body()] = None,
) -> dict:
    """Stop one ingestion job, or every queued and running one when no job_id is given."""
    body = body or StopIngestion()
    targets = control.stop_ingestion(session, body.job_id, request.state.request_id, revoke=revoke,
                                     relay=relay_webhooks)
    return ok(request, {"status": "stopped", "stopped_at": datetime.now(UTC), "jobs": targets})


@router.get("/status", response_model=Envelope[IngestionStatus])
async def ingestion_status(request: Request, _caller: Reader) -> dict:
    overview = await listing.fetch_ingestion_overview()
    current, last = overview["current"], overview["last"]
    return ok(
        request,
        {
            "is_running": current is not None,
            "current_job": current and {
                "id": current["id"],
                "started_at": current["started_at"],
                "progress": current["progress"],
                "records_processed": current["records_processed"],
                "errors": current["records_failed"],
            },
            "last_completed": last and {
                "id": last["id"],
                "completed_at": last["finished_at"],
                "records_processed": last["records_processed"],
                "duration": (last["finished_at"] - last["started_at"]).total_seconds()
                if last["started_at"] and last["finished_at"] else None,
                "state": last["state"],
            },
        },
    )


@router.get("/quarantine", response_model=Envelope[QuarantineList])
def list_quarantine(
    request: Request,
    session: SessionDep,
    _caller: Reader,
    source: str | None = None,
    job_id: str | None = None,
    state: quarantine.State = "unresolved",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Cursor = None,
) -> dict:
    """Rows set aside by ingestion, each held once: unresolved ones by default; `job_id` lists what
    that run met."""
    rows, next_cursor = quarantine.listing(session, source=source, job_id=job_id, state=state, limit=limit,
                                           cursor=cursor)
    data = [
        {"id": r.id, "source": r.source, "job_id": r.job_id, "file": r.file, "line": r.line,
         "reason": r.reason, "raw": r.raw, "created_at": r.created_at, "last_seen_job_id": r.last_seen_job_id,
         "times_seen": r.times_seen, "resolved_at": r.resolved_at, "resolved_by_job_id": r.resolved_by_job_id}
        for r in rows
    ]
    return ok(request, {"rows": data}, next_cursor=next_cursor)
