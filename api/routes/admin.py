"""Operational views: the events journal (admin) and a JSON summary of throughput and queues."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictStr, create_model

from api.broker import broker_status, queue_depths
from api.deps import Admin, Reader, SessionDep
from api.envelope import JSON_INTEGER, Envelope, IsoDateTime, UTCDateTime, ok
from pipelines.core import runtime
from pipelines.jobs import journal, status

router = APIRouter(tags=["operations"])


class LogEntry(BaseModel):
    id: int
    created_at: UTCDateTime
    level: str
    event: str
    message: str
    source: str | None
    job_id: str | None
    details: dict[str, Any]


class LogList(BaseModel):
    logs: list[LogEntry]


@router.get("/logs", response_model=Envelope[LogList])
def logs(
    request: Request,
    session: SessionDep,
    _caller: Admin,
    level: Annotated[Literal["debug", "info", "warning", "error", "critical"] | None,
                     BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)] = None,
    source: str | None = None,
    job_id: str | None = None,
    start_time: IsoDateTime | None = None,
    end_time: IsoDateTime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    # An event id is a bigint: a larger number names no entry (and PostgreSQL would refuse it).
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="the id of the last entry seen")] = None,
) -> dict:
    """Structured job and system events recorded in the database, newest first."""
    where = journal.Filter(level=level, source=source, job_id=job_id, start=start_time, end=end_time)
    rows, before = journal.listing(session, where, cursor, limit)
    entries = [{"id": e.id, "created_at": e.created_at, "level": e.level, "event": e.event, "message": e.message,
                "source": e.source, "job_id": e.job_id, "details": e.details} for e in rows]
    return ok(request, {"logs": entries}, next_cursor=None if before is None else str(before))


@router.get("/metrics", response_model=Envelope[dict[str, Any]])
def metrics(request: Request, session: SessionDep, _caller: Reader) -> dict:
    """Throughput over the last hour, job and database facts, and queue depths."""
    rates = status.throughput(session)
    connected = broker_status()
    return ok(request, {
        "system": {"version": request.app.version, **status.host_stats()},
        "ingestion": dataclasses.asdict(rates),
        "database": status.database_stats(session),
        "queues": queue_depths() if connected else {},
    })


def _knob_field(knob: runtime.Knob, required: bool) -> tuple[Any, Any]:
    rules = Field(ge=knob.low, le=knob.high, pattern=knob.pattern)
    kind = {int: Annotated[int, rules, JSON_INTEGER], float: Annotated[StrictFloat, rules],
            str: Annotated[StrictStr, rules]}[knob.kind]
    return kind, Field(... if required else None, description="applies after a restart" if knob.restart else None)


# The settings as a schema of their own (the document lists each by name and type), made from the knobs.
ConfigValues = create_model("ConfigValues", **{  # type: ignore[call-overload]
    name: _knob_field(knob, True) for name, knob in runtime.KNOBS.items()})
ConfigUpdate = create_model("ConfigUpdate", __config__=ConfigDict(extra="forbid"), **{  # type: ignore[call-overload]
    name: _knob_field(knob, False) for name, knob in runtime.KNOBS.items()})


class ConfigView(BaseModel):
    config: ConfigValues  # type: ignore[valid-type]
    restart_required: list[str]


@router.get("/config", response_model=Envelope[ConfigView])
def get_config(request: Request, _caller: Admin) -> dict:
    """The runtime settings an admin may change (never a secret), and which of them need a restart."""
    restart = sorted(name for name, knob in runtime.KNOBS.items() if knob.restart)
    return ok(request, {"config": runtime.snapshot(), "restart_required": restart})


@router.put("/config", response_model=Envelope[ConfigView])
def put_config(body: ConfigUpdate, request: Request, _caller: Admin) -> dict:  # type: ignore[valid-type]
    """Change runtime settings (all or none); the answer names those that apply only after a restart."""
    restart = runtime.update(body.model_dump(exclude_unset=True))  # type: ignore[attr-defined]
    return ok(request, {"config": runtime.snapshot(), "restart_required": restart},
              message="restart beat for: " + ", ".join(restart) if restart else "applied")
