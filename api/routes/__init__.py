"""One module per area of the HTTP contract."""

from __future__ import annotations

from api.envelope import ApiError
from pipelines import pagination


def newest_first_page(session, query, created_column, id_column, cursor: str | None, limit: int):
    """A page of QUERY's rows, newest first, after CURSOR: (rows, next cursor or None); 422 on a
    cursor that is not one of ours."""
    try:
        query = pagination.newest_first(query, created_column, id_column, cursor, limit)
    except pagination.BadCursor:
        raise ApiError(422, "cursor is not valid") from None
    return pagination.page(list(session.scalars(query)), limit)
