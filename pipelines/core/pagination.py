"""Keyset pages: stable under concurrent inserts, unlike offsets.

A `Keyset` names the columns a listing is ordered on (the last one unique) and pages through it by
comparing row values: `WHERE (created_at, id) < (:last_created, :last_id)`, so each page is an index
range scan however deep it is. Cursors handed to clients are those values, opaque (base64 JSON).

    >>> newest = Keyset((Job.created_at, Job.id), descending=True)
    >>> rows, next_cursor = newest.page(session, select(Job), cursor=None, limit=50)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from pipelines.core.errors import Invalid


class BadCursor(Invalid):
    """A cursor that this server did not hand out (or for another listing)."""


def encode(values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode().rstrip("=")


def decode(cursor: str, arity: int) -> list:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("cursor is not valid") from None
    if not isinstance(values, list) or len(values) != arity:
        raise BadCursor("cursor is not valid")
    return values


def split(rows: list, limit: int) -> tuple[list, bool]:
    """ROWS fetched with one row past LIMIT: the page, and whether another follows."""
    return rows[:limit], len(rows) > limit


@dataclass(frozen=True)
class Keyset:
    columns: tuple[InstrumentedAttribute, ...]
    descending: bool = False

    def fetch(self, session: Session, query: Select, after: Sequence | None, limit: int
              ) -> tuple[list, list | None]:
        """The rows of QUERY past the row values AFTER, in order: (rows, the last row's values when
        another page follows, else None)."""
        keys = tuple_(*self.columns)
        query = query.order_by(*(c.desc() if self.descending else c.asc() for c in self.columns))
        if after is not None:
            query = query.where(keys < tuple(after) if self.descending else keys > tuple(after))
        rows, more = split(list(session.scalars(query.limit(limit + 1))), limit)
        return rows, [getattr(rows[-1], c.key) for c in self.columns] if more else None

    def page(self, session: Session, query: Select, cursor: str | None, limit: int) -> tuple[list, str | None]:
        """`fetch` with opaque cursors. BadCursor for a cursor that is not one of ours."""
        rows, last = self.fetch(session, query, self._decode(cursor) if cursor else None, limit)
        return rows, None if last is None else encode([_plain(v) for v in last])

    def _decode(self, cursor: str) -> list:
        values = decode(cursor, len(self.columns))
        try:
            return [_typed(column, value) for column, value in zip(self.columns, values, strict=True)]
        except (TypeError, ValueError):
            raise BadCursor("cursor is not valid") from None


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date) else value  # dates and datetimes


def _typed(column: InstrumentedAttribute, value: Any) -> Any:
    kind = column.type.python_type
    if kind in (datetime, date):
        return kind.fromisoformat(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{column.key}: {value!r} is not {kind.__name__}")
    return value


# Totals are counted this far and no further: past it, a total says "at least this many". Counting
# every row a filter matches costs a scan of all of them, for every new filter, by anyone.
COUNT_CAP = 100_000


@dataclass(frozen=True)
class Total:
    count: int  # exact, or COUNT_CAP when there are more
    exact: bool


def capped_count(session: Session, query: Select, cap: int = COUNT_CAP) -> Total:
    """How many rows QUERY (a SELECT with its filters) matches, reading at most CAP + 1 of them."""
    found = session.scalar(select(func.count()).select_from(query.limit(cap + 1).subquery())) or 0
    return Total(found, True) if found <= cap else Total(cap, False)
