"""Opaque keyset cursors: stable under concurrent inserts, unlike offsets."""

from __future__ import annotations

import base64
import json


class BadCursor(ValueError):
    pass


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


def newest_first(query, created_column, id_column, cursor: str | None, limit: int):
    """QUERY ordered newest first by (created, id), from after CURSOR, one row past LIMIT (to know
    whether another page follows). BadCursor for a cursor that is not one of ours."""
    from datetime import datetime

    from sqlalchemy import and_, or_

    query = query.order_by(created_column.desc(), id_column.desc()).limit(limit + 1)
    if cursor:
        try:
            created, last_id = decode(cursor, 2)
            created = datetime.fromisoformat(created)
        except (TypeError, ValueError):
            raise BadCursor("cursor is not valid") from None
        query = query.where(or_(created_column < created, and_(created_column == created, id_column < last_id)))
    return query


def page(rows: list, limit: int) -> tuple[list, str | None]:
    """The first LIMIT of ROWS (fetched with one extra), and the cursor to the next page or None."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode([rows[-1].created_at.isoformat(), rows[-1].id])
