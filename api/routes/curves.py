"""Forward curves: points, one as-of date against another, dimensions, and locations by ISO."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from api.deps import Reader, SessionDep
from api.envelope import Cursor, Envelope, IsoDate, found, ok
from pipelines.core import cache
from pipelines.curves import queries

router = APIRouter(tags=["curves"])


class CurvePoint(BaseModel):
    curve_key: str
    asof_date: dt.date
    tenor_label: str | None
    contract_month: dt.date
    value: float | None
    currency: str | None
    unit: str | None
    asset_class: str | None
    iso: str | None
    location: str | None


class DiffRow(BaseModel):
    tenor_label: str | None
    contract_month: dt.date
    value_a: float | None
    value_b: float | None
    diff_abs: float | None
    diff_pct: float | None


class Location(BaseModel):
    location_id: str
    iso: str
    location: str
    curve_keys: list[str]
    asset_classes: list[str]
    first_asof: dt.date
    last_asof: dt.date


class Dimensions(Envelope[dict[str, list[Any]]]):
    counts: dict[str, list[dict[str, Any]]] | None = None


@router.get("/curves", response_model=Envelope[list[CurvePoint]])
def list_curves(
    request: Request,
    session: SessionDep,
    _caller: Reader,
    asof_date: IsoDate | None = None,
    curve_key: str | None = None,
    asset_class: str | None = None,
    iso: str | None = None,
    location: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    cursor: Cursor = None,
) -> dict:
    """Curve points in (curve_key, asof_date, contract_month) order; without `asof_date`, each curve's
    latest."""
    where = queries.CurveFilter(asof_date, curve_key, asset_class, iso, location)
    rows, next_cursor = queries.points(session, where, cursor, limit)
    return ok(request, [CurvePoint.model_validate(r, from_attributes=True) for r in rows], next_cursor=next_cursor)


@router.get("/curves/diff", response_model=Envelope[list[DiffRow]])
def diff(request: Request, session: SessionDep, _caller: Reader, curve_key: str, asof_a: IsoDate,
         asof_b: IsoDate) -> dict:
    """Per contract month: both values, `diff_abs = value_b - value_a`, `diff_pct = 100 * diff_abs /
    |value_a|` (null for a month on one date only, and `diff_pct` null where `value_a` is 0)."""
    return ok(request, queries.diff(session, curve_key, asof_a, asof_b))


@router.get("/metadata/dimensions", response_model=Dimensions, response_model_exclude_none=True)
def dimensions(request: Request, session: SessionDep, _caller: Reader, include_counts: bool = False) -> dict:
    """The asset classes, ISOs, locations and curve keys the curves cover; with counts of distinct
    curves. Cached, and refreshed whenever a curves ingestion commits."""
    answer = cache.cached(f"{queries.CACHE_GROUP}dimensions:{include_counts}",
                          lambda: queries.dimensions(session, include_counts))
    body = ok(request, answer["data"])
    if include_counts:
        body["counts"] = answer["counts"]
    return body


@router.get("/locations/iso", response_model=Envelope[list[Location]])
def locations(request: Request, session: SessionDep, _caller: Reader, iso: str | None = None) -> dict:
    """The (ISO, location) pairs the curves are priced at, each with a stable `location_id`."""
    return ok(request, queries.locations(session, iso))


@router.get("/locations/iso/{location_id}", response_model=Envelope[Location])
def location(location_id: str, request: Request, session: SessionDep, _caller: Reader) -> dict:
    return ok(request, found(queries.location(session, location_id), f"no location '{location_id}'"))
