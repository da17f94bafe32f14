"""Sources as the API shows them: declaration, state and statistics, with no secret revealed."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipelines.core import runtime
from pipelines.core.errors import Conflict, Invalid, NotFound
from pipelines.core.models import Observation, SourceState
from pipelines.core.pagination import capped_count
from pipelines.ingestion.sources.registry import Registry
from pipelines.jobs import schedules
from pipelines.jobs.control import active_sources

_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")


def _redact(values: dict) -> dict:
    """Header and parameter values are shown only when they are ${VAR} references."""
    return {k: _shown(v) for k, v in values.items()}


def _shown(value) -> str:
    return value if isinstance(value, str) and _REFERENCE.match(value) else "<redacted>"


def _redact_url(url: str | None) -> str | None:
    """URL with its query values redacted as parameters are (names kept, ${VAR} references shown) and
    no user or password."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = urlencode([(name, _shown(value)) for name, value in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="${}<>")
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def _states(session: Session) -> dict[str, SourceState]:
    return {row.source: row for row in session.scalars(select(SourceState))}


def summaries(session: Session, registry: Registry) -> list[dict]:
    states, running = _states(session), active_sources(session)
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
    summary = _summary(registry, source_id, state, source_id in active_sources(session))
    total = capped_count(session, select(Observation.id).where(Observation.source == source_id))
    config = registry.sources.get(source_id)
    body = config.model_dump(exclude={"id", "validation"}) if config else {}
    if config:
        body["headers"] = _redact(config.headers)
        body["params"] = _redact(config.params)
        body["url"] = _redact_url(config.url)
    return {
        **summary,
        "config": body,
        "validation": config.validation.model_dump() | {"primary_key": config.primary_key} if config else {},
        "schedule": _schedule(config),
        "next_run_at": _next_run(config, state),
        "last_scheduled_at": state.last_scheduled_at if state else None,
        "error": registry.errors.get(source_id),
        "sync_stats": {
            "total_records": total.count,  # at least this many when total_records_exact is false
            "total_records_exact": total.exact,
            "successful": state.successful if state else 0,
            "failed": state.failed if state else 0,
            "skipped": state.skipped if state else 0,  # scheduled ticks that found a run still active
            "last_error": registry.errors.get(source_id) or (state.last_error if state else None),
            "last_sync": state.last_sync if state else None,
        },
    }


def _schedule(config) -> str | None:
    """The schedule the source runs on (its own, or the ingestion interval), None if unscheduled."""
    return None if config is None else schedules.of_source(config, runtime.value("ingestion_interval_seconds"))


def _next_run(config, state: SourceState | None) -> datetime | None:
    """When the source's schedule fires next, as beat decides it; None unscheduled or disabled."""
    spec = _schedule(config)
    if spec is None:
        return None
    return schedules.next_run(spec, state.last_scheduled_at if state else None, datetime.now(UTC))


class UnknownSources(NotFound):
    def __init__(self, sources: list[str]):
        super().__init__(f"unknown source(s): {', '.join(sources)}", {"sources": sources})
        self.sources = sources


class InvalidSources(Invalid):
    def __init__(self, errors: dict[str, str]):
        super().__init__("source declaration(s) are invalid", {"sources": errors})
        self.errors = errors


class NoEnabledSource(Conflict):  # nothing to start in what is declared now: the server's state
    def __init__(self) -> None:
        super().__init__("no enabled source is declared")


def resolve(registry: Registry, requested: list[str] | None) -> list[str]:
    """The sources a request names (each once, in its order), or every enabled one when it names none.
    UnknownSources, InvalidSources, NoEnabledSource."""
    if not requested:
        enabled = registry.enabled()
        if not enabled:
            raise NoEnabledSource()
        return enabled
    sources = list(dict.fromkeys(requested))
    unknown = [s for s in sources if s not in registry.ids()]
    if unknown:
        raise UnknownSources(unknown)
    invalid = {s: registry.errors[s] for s in sources if s in registry.errors}
    if invalid:
        raise InvalidSources(invalid)
    return sources
