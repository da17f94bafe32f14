"""Reading forward curves: points (each curve's latest as-of date by default), one as-of date against
another, the dimensions the curves cover, and the (ISO, location) pairs they are priced at.

Every query starts from an index: points by their key, curves by `curve_index` (one row per curve,
written with the points), so none scans the points table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from pipelines.core.errors import NotFound
from pipelines.core.models import Curve, CurveIndex
from pipelines.core.pagination import Keyset

BY_KEY = Keyset((Curve.curve_key, Curve.asof_date, Curve.contract_month))
DIMENSIONS = ("asset_class", "iso", "location", "curve_key")
CACHE_GROUP = "curves:"  # cache entries built from the curves, dropped when a curves ingestion commits


class NoCurve(NotFound):
    """No curve has that key, or it has no points on that as-of date."""


@dataclass(frozen=True)
class CurveFilter:
    asof_date: date | None = None  # None: each curve's latest
    curve_key: str | None = None
    asset_class: str | None = None
    iso: str | None = None
    location: str | None = None


def points(session: Session, where: CurveFilter, cursor: str | None, limit: int) -> tuple[list[Curve], str | None]:
    """Curve points in key order, filtered; BadCursor for a cursor that is not ours."""
    query = select(Curve).join(CurveIndex, CurveIndex.curve_key == Curve.curve_key)
    if where.asof_date is None:
        query = query.where(Curve.asof_date == CurveIndex.last_asof)
    else:
        query = query.where(Curve.asof_date == where.asof_date)
    if where.curve_key is not None:
        query = query.where(CurveIndex.curve_key == where.curve_key)
    for column, value in ((CurveIndex.asset_class, where.asset_class), (CurveIndex.iso, where.iso),
                          (CurveIndex.location, where.location)):
        if value is not None:  # whatever the letter case: NATURAL_GAS finds natural_gas (seed 000's clients)
            query = query.where(func.lower(column) == value.lower())
    return BY_KEY.page(session, query, cursor, limit)


def diff(session: Session, curve_key: str, asof_a: date, asof_b: date) -> list[dict]:
    """Per contract month present on either date: both values, `diff_abs = b - a` and
    `diff_pct = 100 * diff_abs / |a|` (null when a side is missing, or `a` is 0). NoCurve when the
    key is unknown or either date has no curve."""
    def side(asof: date):
        return (select(Curve.contract_month, Curve.tenor_label, Curve.value)
                .where(Curve.curve_key == curve_key, Curve.asof_date == asof).subquery())

    a, b = side(asof_a), side(asof_b)
    rows = session.execute(
        select(func.coalesce(a.c.contract_month, b.c.contract_month).label("contract_month"),
               func.coalesce(b.c.tenor_label, a.c.tenor_label).label("tenor_label"),
               a.c.contract_month.is_not(None).label("on_a"), b.c.contract_month.is_not(None).label("on_b"),
               a.c.value.label("value_a"), b.c.value.label("value_b"))
        .select_from(a.join(b, a.c.contract_month == b.c.contract_month, full=True))
        .order_by("contract_month")
    ).all()
    if not any(r.on_a for r in rows) or not any(r.on_b for r in rows):
        missing = asof_a if not any(r.on_a for r in rows) else asof_b
        raise NoCurve(f"no curve '{curve_key}' on {missing.isoformat()}")
    return [_diff_row(r) for r in rows]


def _diff_row(r) -> dict:
    value_a, value_b = r.value_a, r.value_b
    both = r.on_a and r.on_b and value_a is not None and value_b is not None
    diff_abs = value_b - value_a if both else None
    diff_pct = 100 * diff_abs / abs(value_a) if diff_abs is not None and value_a != 0 else None
    return {"tenor_label": r.tenor_label, "contract_month": r.contract_month, "value_a": value_a,
            "value_b": value_b, "diff_abs": diff_abs, "diff_pct": diff_pct}


def dimensions(session: Session, include_counts: bool) -> dict:
    """The values of each dimension, sorted; with counts, how many distinct curves have each. A value
    stored in several letter cases is one value (filters match whatever the case), shown once, as
    most of its curves spell it."""
    values: dict[str, list] = {}
    counts: dict[str, list] = {}
    for name in DIMENSIONS:
        column = getattr(CurveIndex, name)
        folded = column if name == "curve_key" else func.lower(column)
        spelled = func.mode().within_group(column)
        rows = session.execute(select(spelled, func.count()).where(column.is_not(None))
                               .group_by(folded).order_by(spelled)).all()
        values[name] = [v for v, _ in rows]
        counts[name] = [{"value": v, "count": n} for v, n in rows]
    return {"data": values, "counts": counts} if include_counts else {"data": values}


def location_id(iso: str | None, location: str | None) -> str:
    """A stable id for an (ISO, location) pair: the same pair gets the same id on every server."""
    digest = hashlib.sha256(f"{iso or ''}\x00{location or ''}".encode()).hexdigest()
    return f"loc_{digest[:16]}"


def locations(session: Session, iso: str | None = None) -> list[dict]:
    """Every (ISO, location) pair the curves are priced at, with its curves and as-of range."""
    query = (select(CurveIndex.iso, CurveIndex.location,
                    func.array_agg(func.distinct(CurveIndex.curve_key)).label("curve_keys"),
                    func.array_agg(func.distinct(CurveIndex.asset_class)).label("asset_classes"),
                    func.min(CurveIndex.first_asof).label("first_asof"),
                    func.max(CurveIndex.last_asof).label("last_asof"))
             .where(and_(CurveIndex.iso.is_not(None), CurveIndex.location.is_not(None)))
             .group_by(CurveIndex.iso, CurveIndex.location).order_by(CurveIndex.iso, CurveIndex.location))
    if iso is not None:
        query = query.where(func.lower(CurveIndex.iso) == iso.lower())
    return [{"location_id": location_id(r.iso, r.location), "iso": r.iso, "location": r.location,
             "curve_keys": sorted(r.curve_keys), "asset_classes": sorted(a for a in r.asset_classes if a),
             "first_asof": r.first_asof, "last_asof": r.last_asof} for r in session.execute(query)]


def location(session: Session, wanted: str) -> dict | None:
    return next((loc for loc in locations(session) if loc["location_id"] == wanted), None)


def known_keys(session: Session, keys: list[str]) -> set[str]:
    """Which of KEYS name a stored curve."""
    return set(session.scalars(select(CurveIndex.curve_key).where(CurveIndex.curve_key.in_(keys))))


def spelt_otherwise(session: Session, keys: list[str]) -> dict[str, str]:
    """For each of KEYS that a stored curve's key matches but for letter case, that key. (A scan of
    the index of curves, one row a curve: asked only when a key is not found.)"""
    wanted = {key.lower(): key for key in keys}
    stored = session.scalars(select(CurveIndex.curve_key).where(func.lower(CurveIndex.curve_key).in_(wanted)))
    return {wanted[found.lower()]: found for found in stored}
