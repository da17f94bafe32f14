"""Declared sources, their state and statistics."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.deps import ReadKey, SessionDep
from api.envelope import ApiError, Envelope, ok
from api.registry import registry_or_error
from api.schemas import SourceDetail, SourceList
from pipelines import catalog

router = APIRouter(prefix="/sources", tags=["sources"])


@router.get("", response_model=Envelope[SourceList])
def list_sources(request: Request, session: SessionDep, _key: ReadKey) -> dict:
    registry = registry_or_error()
    return ok(request, {"sources": catalog.summaries(session, registry)})


@router.get("/{source_id}", response_model=Envelope[SourceDetail])
def get_source(source_id: str, request: Request, session: SessionDep, _key: ReadKey) -> dict:
    registry = registry_or_error()
    if source_id not in registry.ids():
        raise ApiError(404, f"no source '{source_id}' is declared")
    return ok(request, catalog.detail(session, registry, source_id))
