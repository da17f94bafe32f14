"""Keyset pages, table-driven: cursors round-trip, foreign cursors are refused, pages tile a listing."""

import datetime as dt

import pytest
from sqlalchemy import select

from pipelines.core import pagination
from pipelines.core.db import session_scope
from pipelines.core.models import Event
from pipelines.jobs import journal
from pipelines.jobs.listing import NEWEST_FIRST


@pytest.mark.parametrize("values", [[1], ["job_abc", 2], ["2026-01-01T00:00:00+00:00", "id"], [None, "ü/+="]])
def test_cursor_round_trips(values):
    assert pagination.decode(pagination.encode(values), len(values)) == values


@pytest.mark.parametrize(("cursor", "arity"), [
    ("garbage!", 2),  # not base64
    (pagination.encode([1, 2, 3]), 2),  # another listing's cursor
    (pagination.encode({"a": 1}), 1),  # not a list
    ("", 1),
])
def test_foreign_cursors_are_refused(cursor, arity):
    with pytest.raises(pagination.BadCursor):
        pagination.decode(cursor, arity)


@pytest.mark.parametrize("cursor", [
    pagination.encode(["not a time", "job_x"]),
    pagination.encode([12, "job_x"]),
    pagination.encode(["2026-01-01T00:00:00+00:00", 7]),  # an id must be text
])
def test_values_of_the_wrong_type_are_refused(session, cursor):
    with pytest.raises(pagination.BadCursor):
        NEWEST_FIRST.page(session, select(), cursor, 10)


@pytest.mark.parametrize("limit", [1, 3, 7, 20])
def test_pages_tile_the_listing_with_no_gap_or_repeat(limit):
    with session_scope() as s:
        for i in range(7):
            journal.record(s, "test.event", f"event {i}")
    seen, before = [], None
    for _ in range(10):
        with session_scope() as s:
            rows, before = journal.listing(s, journal.Filter(), before, limit)
            seen += [r.message for r in rows]
        if before is None:
            break
    assert seen == [f"event {i}" for i in reversed(range(7))]


def test_split():
    assert pagination.split([1, 2, 3], 2) == ([1, 2], True)
    assert pagination.split([1, 2], 2) == ([1, 2], False)


def test_the_keyset_orders_on_every_column(session):
    now = dt.datetime.now(dt.UTC)
    session.add_all([Event(level="info", event="e", message=m, details={}, created_at=now) for m in "abc"])
    session.flush()
    rows, last = pagination.Keyset((Event.id,)).fetch(session, select(Event), None, 2)
    assert [r.message for r in rows] == ["a", "b"] and last == [rows[-1].id]
