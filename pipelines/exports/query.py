"""The data query: filters, a whitelisted sort, and page or keyset (cursor) pagination.

Everything reaches SQL as bound parameters; sort fields come from a fixed list. Keyset cursors are
stable under concurrent inserts: a page starts strictly after the last row of the previous one in
(sort field, source, id) order, with rows lacking the sort value last.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, UnaryExpression, and_, or_, select, tuple_
from sqlalchemy.orm import Session

from pipelines.core import cache, pagination
from pipelines.core.models import Observation

TOTALS = "query-totals:"  # the cache group of query totals, dropped when an ingestion commits rows
SORT_FIELDS = {
    "timestamp": Observation.timestamp,
    "value": Observation.value,
    "id": Observation.id,
    "source": Observation.source,
    "ingested_at": Observation.ingested_at,
}


@dataclass
class Query:
    source: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    min_value: float | None = None
    max_value: float | None = None
    sort: str = "timestamp"
    descending: bool = False
    limit: int = 100
    page: int | None = None
    cursor: str | None = None


    @classmethod
    def from_filters(cls, filters: dict, **fields) -> Query:
        """A query from the API's `filters` object (as the export job stores it)."""
        dates, values = filters.get("date_range") or {}, filters.get("value_range") or {}
        return cls(source=filters.get("source"), start=_time(dates.get("start")), end=_time(dates.get("end")),
                   min_value=values.get("min"), max_value=values.get("max"), **fields)


def _time(value) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def conditions(q: Query) -> list:
    """The WHERE conditions of Q's filters: one definition for the query API and for exports."""
    conditions = []
    if q.source is not None:
        conditions.append(Observation.source == q.source)
    if q.start is not None:
        conditions.append(Observation.timestamp >= q.start)
    if q.end is not None:
        conditions.append(Observation.timestamp <= q.end)
    if q.min_value is not None:
        conditions.append(Observation.value >= q.min_value)
    if q.max_value is not None:
        conditions.append(Observation.value <= q.max_value)
    return conditions


def _after(q: Query, cursor: list) -> ColumnElement[bool]:
    """Rows strictly after CURSOR (sort value, source, id) in the query's order."""
    value, source, row_id = cursor
    column = SORT_FIELDS[q.sort]
    if q.sort in ("timestamp", "ingested_at") and value is not None:
        value = datetime.fromisoformat(value)
    keys = tuple_(column, Observation.source, Observation.id)
    rest = tuple_(Observation.source, Observation.id)
    if value is None:  # already among the rows without a value, which come last
        return and_(column.is_(None), rest < (source, row_id) if q.descending else rest > (source, row_id))
    past = keys < (value, source, row_id) if q.descending else keys > (value, source, row_id)
    return or_(past, column.is_(None))


def _encode(q: Query, row: Observation) -> str:
    value = getattr(row, q.sort)
    if isinstance(value, datetime):
        value = value.isoformat()
    return pagination.encode([value, row.source, row.id])


def _total(session: Session, q: Query, where: list) -> pagination.Total:
    """How many rows Q's filters match, up to pagination.COUNT_CAP (past it: at least that many):
    counted once, then kept in Redis (every API process shares it) until an ingestion commits new
    rows or a minute passes, not counted again for every page."""
    filters = json.dumps([q.source, q.start and q.start.isoformat(), q.end and q.end.isoformat(), q.min_value,
                          q.max_value])
    key = TOTALS + hashlib.sha256(filters.encode()).hexdigest()
    count, exact = cache.cached(key, lambda: astuple(pagination.capped_count(
        session, select(Observation.id).where(*where))), ttl=60)
    return pagination.Total(int(count), bool(exact))


def run(session: Session, q: Query) -> tuple[list[Observation], dict]:
    """One page of rows and the pagination facts (page, limit, total, pages, next_cursor)."""
    column = SORT_FIELDS[q.sort]
    conditions_ = conditions(q)
    total = _total(session, q, conditions_)
    order: list[UnaryExpression[Any]] = [column.desc().nulls_last() if q.descending else column.asc().nulls_last()]
    order += [tie.desc() if q.descending else tie.asc() for tie in (Observation.source, Observation.id)]
    statement = select(Observation).where(*conditions_).order_by(*order).limit(q.limit + 1)
    page = None
    if q.cursor:
        statement = statement.where(_after(q, pagination.decode(q.cursor, 3)))
    else:
        page = q.page or 1
        statement = statement.offset((page - 1) * q.limit)
    rows, more = pagination.split(list(session.scalars(statement)), q.limit)
    return rows, {
        "page": page,
        "limit": q.limit,
        "total": total.count,  # at least this many when total_exact is false
        "total_exact": total.exact,
        "pages": math.ceil(total.count / q.limit) if total.count else 0,
        "next_cursor": _encode(q, rows[-1]) if more and rows else None,
    }
