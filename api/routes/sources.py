"""Declared sources, their state and statistics."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import Reader, SessionDep, Writer, limit
from api.envelope import ApiError, Envelope, ok
from api.registry import registry_or_error
from api.schemas import SourceDetail, SourceList, SourceTest
from pipelines.ingestion import catalog, probe

router = APIRouter(prefix="/sources", tags=["sources"])


@router.get("", response_model=Envelope[SourceList])
def list_sources(request: Request, session: SessionDep, _caller: Reader) -> dict:
    registry = registry_or_error()
    return ok(request, {"sources": catalog.summaries(session, registry)}, next_cursor=None)


@router.get("/{source_id}", response_model=Envelope[SourceDetail])
def get_source(source_id: str, request: Request, session: SessionDep, _caller: Reader) -> dict:
    registry = registry_or_error()
    if source_id not in registry.ids():
        raise ApiError(404, f"no source '{source_id}' is declared")
    return ok(request, catalog.detail(session, registry, source_id))


@router.post("/{source_id}/test", response_model=Envelope[SourceTest],
             dependencies=[limit("source_test", "source_test_rate_limit_per_minute")])
def test_source(source_id: str, request: Request, _caller: Writer) -> dict:
    """Connect, read up to 5 rows through validation and count the records when that is cheap.
    Writes nothing. An unreachable source answers `connected: false` with the reason. It reaches out
    to the source from the API process: it needs the write scope, and a key may run a few a minute."""
    registry = registry_or_error()
    if source_id not in registry.ids():
        raise ApiError(404, f"no source '{source_id}' is declared")
    return ok(request, probe.probe(registry, source_id))
