"""Sources as the API shows them: declaration, state and statistics, with no secret revealed."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipelines.models import ACTIVE_STATES, Job, Observation, SourceState
from pipelines.sources.registry import Registry

_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def _redact(values: dict) -> dict:
    """Header and parameter values are shown only when they are ${VAR} references."""
    return {k: v if isinstance(v, str) and _REFERENCE.match(v) else "<redacted>" for k, v in values.items()}


def _states(session: Session) -> dict[str, SourceState]:
    return {row.source: row for row in session.scalars(select(SourceState))}


def _running(session: Session) -> set[str]:
    rows = session.scalars(select(Job.sources).where(Job.kind == "ingestion", Job.state.in_(ACTIVE_STATES)))
    return {s for row in rows for s in row}


def summaries(session: Session, registry: Registry) -> list[dict]:
    states, running = _states(session), _running(session)
    return [_summary(registry, sid, states.get(sid), sid in running) for sid in registry.ids()]


def _summary(registry: Registry, source_id: str, state: SourceState | None, running: bool) -> dict:
    config = registry.sources.get(source_id)
    if config is None:
        return {"id": source_id, "name": source_id, "type": None, "enabled": False,
                "last_sync": state.last_sync if state else None, "status": "invalid"}
    status = "running" if running else (state.status if state else "never_run")
    return {
        "id": source_id,
        "name": config.display_name,
        "type": config.type,
        "enabled": config.enabled,
        "last_sync": state.last_sync if state else None,
        "status": status,
    }


def detail(session: Session, registry: Registry, source_id: str) -> dict:
    state = session.get(SourceState, source_id)
    summary = _summary(registry, source_id, state, source_id in _running(session))
    total = session.scalar(select(func.count()).select_from(Observation).where(Observation.source == source_id))
    config = registry.sources.get(source_id)
    body = config.model_dump(exclude={"id", "validation"}) if config else {}
    if config:
        body["headers"] = _redact(config.headers)
        body["params"] = _redact(config.params)
    return {
        **summary,
        "config": body,
        "validation": config.validation.model_dump() | {"primary_key": config.primary_key} if config else {},
        "schedule": config.schedule if config else None,
        "error": registry.errors.get(source_id),
        "sync_stats": {
            "total_records": total,
            "successful": state.successful if state else 0,
            "failed": state.failed if state else 0,
            "last_error": registry.errors.get(source_id) or (state.last_error if state else None),
            "last_sync": state.last_sync if state else None,
        },
    }
