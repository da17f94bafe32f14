"""POST /data/query: filters, page and cursor pagination, sort, headers, hostile input."""

import datetime as dt
import re

import httpx
import numpy as np
import pyarrow as pa
import pytest

from pipelines.core.pagination import encode
from pipelines.ingestion.validate import ValidBatch
from tests.helpers import explain, seed, statements_run, wait_for

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def rows():
    """60 rows over two sources; a few without a value to sort."""
    data = []
    for source in ("alpha", "beta"):
        ids = [f"{source[0]}{i:03d}" for i in range(30)]
        stamps = [T0 + dt.timedelta(hours=i) for i in range(30)]
        values = [None if i % 10 == 9 else float((i * 7) % 30) for i in range(30)]
        batch = ValidBatch(pa.array(ids), {"timestamp": pa.array(stamps, pa.timestamp("us", "UTC")),
                                           "value": pa.array(values, pa.float64())},
                           {"n": pa.array(list(range(30)))}, np.arange(30))
        seed(source, "job_q", batch)
        data += [{"id": i, "source": source, "timestamp": t, "value": v} for i, t, v in zip(ids, stamps, values,
                                                                                           strict=True)]
    return data


@pytest.fixture
def http(api_url, admin_key):
    with httpx.Client(base_url=api_url, headers={"X-API-Key": admin_key}) as c:
        yield c


def query(http, **body) -> httpx.Response:
    return http.post("/api/v1/data/query", json=body)


def test_filters_and_page_pagination(http, rows):
    r = query(http, filters={"source": "alpha", "date_range": {"start": "2026-01-01T05:00:00Z",
                                                                "end": "2026-01-01T20:00:00Z"},
                             "value_range": {"min": 5, "max": 25}},
              pagination={"page": 2, "limit": 3})
    assert r.status_code == 200
    expected = [x for x in rows if x["source"] == "alpha" and 5 <= x["timestamp"].hour <= 20
                and x["value"] is not None and 5 <= x["value"] <= 25]
    body = r.json()["data"]
    assert body["pagination"]["total"] == len(expected) and body["pagination"]["pages"] == -(-len(expected) // 3)
    assert [rec["id"] for rec in body["records"]] == [x["id"] for x in expected][3:6]
    assert body["records"][0]["timestamp"].endswith("Z") and body["records"][0]["metadata"]["n"] >= 0
    assert r.headers["X-Pagination-Page"] == "2" and r.headers["X-Pagination-Limit"] == "3"
    assert r.headers["X-Pagination-Total"] == str(len(expected))
    assert r.headers["X-Pagination-Pages"] == str(body["pagination"]["pages"])


@pytest.mark.parametrize(("field", "order"), [("timestamp", "asc"), ("value", "desc"), ("value", "asc"),
                                              ("id", "desc"), ("source", "asc"), ("source", "desc")])
def test_cursor_pagination_walks_everything_once_in_order_even_with_inserts(http, rows, field, order):
    seen, cursor, pages = [], None, 0
    while True:
        pagination = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        r = query(http, sort={"field": field, "order": order}, pagination=pagination)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        seen += [(rec["source"], rec["id"]) for rec in data["records"]]
        pages += 1
        if pages == 2:  # a row arriving mid-walk must not shift or repeat what follows
            batch = ValidBatch(pa.array(["zzz"]), {"timestamp": pa.array([T0], pa.timestamp("us", "UTC")),
                                                   "value": pa.array([-1.0])}, {}, np.arange(1))
            seed("alpha", "job_q", batch)
        cursor = data["pagination"]["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) and set(seen) >= {(x["source"], x["id"]) for x in rows}

    def key(x):
        value = x[field]
        missing = value is None
        return (missing, value if not missing else 0, x["source"], x["id"])

    expected = sorted(rows, key=key, reverse=(order == "desc"))
    if order == "desc":  # rows without a value come last either way
        expected = [x for x in expected if x[field] is not None] + [x for x in expected if x[field] is None]
    walked = [s for s in seen if s != ("alpha", "zzz")]
    assert walked == [(x["source"], x["id"]) for x in expected]


def expected_order(rows, field, order):
    """ROWS in the query's order: by FIELD then source and id, in ORDER; rows without FIELD last."""
    valued = sorted((x for x in rows if x[field] is not None), key=lambda x: (x[field], x["source"], x["id"]),
                    reverse=order == "desc")
    missing = sorted((x for x in rows if x[field] is None), key=lambda x: (x["source"], x["id"]),
                     reverse=order == "desc")
    return [(x["source"], x["id"]) for x in valued + missing]


@pytest.mark.parametrize(("field", "order"), [("value", "desc"), ("value", "asc"), ("timestamp", "desc"),
                                              ("source", "desc"), ("id", "asc")])
def test_numbered_pages_cross_from_valued_rows_to_rows_without_a_value(http, rows, field, order):
    if field == "timestamp":  # give some rows no timestamp, so that both parts have rows
        from sqlalchemy import text

        from pipelines.core.db import get_engine

        with get_engine().begin() as conn:
            conn.execute(text("UPDATE observations SET timestamp = NULL WHERE id LIKE '%5'"))
        rows = [{**x, "timestamp": None if x["id"].endswith("5") else x["timestamp"]} for x in rows]
    walked = []
    for page in range(1, 20):
        r = query(http, sort={"field": field, "order": order}, pagination={"page": page, "limit": 7})
        assert r.status_code == 200, r.text
        records = r.json()["data"]["records"]
        walked += [(rec["source"], rec["id"]) for rec in records]
        if not records:
            break
    assert walked == expected_order(rows, field, order)


@pytest.mark.parametrize("field", ["timestamp", "value", "id", "source", "ingested_at"])
@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("mode", ["page", "cursor"])
def test_every_sort_the_contract_offers_is_served_by_an_index(rows, field, order, mode):
    """The statements `query.run` builds, explained with sorting priced out: an index must give the order,
    and nothing is sorted but the page's own rows (a page 2,000 deep must not sort every row the filters
    match)."""
    from sqlalchemy import text

    from pipelines.core.db import new_session
    from pipelines.exports import query as data_query

    with new_session() as session:
        connection = session.connection()
        first, info = data_query.run(session, data_query.Query(sort=field, descending=order == "desc", limit=3))
        with statements_run(connection) as statements:
            if mode == "cursor":
                data_query.run(session, data_query.Query(sort=field, descending=order == "desc", limit=3,
                                                         cursor=info["next_cursor"]))
            else:
                data_query.run(session, data_query.Query(sort=field, descending=order == "desc", limit=3, page=3))
        session.execute(text("SET LOCAL enable_sort = off"))
        pages = [(s, p) for s, p in statements if "ORDER BY" in s]
        assert pages, statements
        for statement, parameters in pages:
            plan = explain(connection, statement, parameters)
            sorted_rows = [int(n) for n in re.findall(r"Sort  \(cost=\S+ rows=(\d+)", plan)]
            assert all(n <= 4 for n in sorted_rows), plan  # nothing sorted but the page itself (limit 3)


@pytest.mark.parametrize("body", [
    {"sort": {"field": "value; DROP TABLE observations"}},
    {"sort": {"field": "timestamp", "order": "sideways"}},
    {"pagination": {"limit": 10**9}},
    {"pagination": {"page": 0}},
    {"pagination": {"page": 1_000_000, "limit": 1000}},  # OFFSET a billion rows deep
    {"pagination": {"page": 102, "limit": 1000}},
    {"pagination": {"page": 1, "cursor": "abc"}},
    {"pagination": {"cursor": "not-a-cursor"}},
    {"pagination": {"cursor": "WzEsMiwzXQ"}},
    # Cursors of the right shape whose values the sort's column cannot hold:
    {"sort": {"field": "id"}, "pagination": {"cursor": encode([None, "alpha", "a1"])}},
    {"sort": {"field": "source"}, "pagination": {"cursor": encode([None, "alpha", "a1"])}},
    {"sort": {"field": "value"}, "pagination": {"cursor": encode(["high", "alpha", "a1"])}},
    {"sort": {"field": "timestamp"}, "pagination": {"cursor": encode(["yesterday", "alpha", "a1"])}},
    {"sort": {"field": "timestamp"}, "pagination": {"cursor": encode(["2026-01-01T00:00:00+00:00", "alpha", 7])}},
    {"filters": {"date_range": {"start": "yesterday"}}},
    {"filters": {"value_range": {"min": "1 OR 1=1"}}},
    {"filters": {"colour": "red"}},
    {"filters": {"date_range": {"start": "2026-01-01T00:00:00"}}},
])
def test_hostile_input_is_a_422_in_the_envelope(http, rows, body):
    r = query(http, **body)
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False and r.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(("body", "said"), [
    ('{"filters": {"date_range": {"start": "2026-03-01T00:00:00Z", "end": "2026-01-01"}}}', "'start' is after 'end'"),
    ('{"filters": {"value_range": {"min": 10, "max": 1}}}', "'min' is above 'max'"),
    ('{"filters": {"value_range": {"min": 1e999}}}', "finite number"),  # JSON's way to say infinity
    ('{"filters": {"value_range": {"max": -1e999}}}', "finite number"),
])
def test_a_range_that_can_match_nothing_is_refused_saying_why(http, rows, body, said):
    """An inverted range, or an infinite bound, is a mistake in the request: 422 naming it, not an
    empty page that looks like missing data."""
    r = http.post("/api/v1/data/query", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert said in str(r.json()["error"]["details"]), r.json()["error"]


def test_a_date_alone_is_its_midnight_utc(http, rows):
    alone = query(http, filters={"date_range": {"start": "2026-01-01", "end": "2026-01-01T05:00:00Z"}})
    spelt = query(http, filters={"date_range": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T05:00:00Z"}})
    assert alone.status_code == 200, alone.text
    assert alone.json()["data"]["records"] == spelt.json()["data"]["records"]
    assert alone.json()["data"]["pagination"]["total"] == 2 * 6


def test_sql_in_a_filter_value_is_just_a_value(http, rows):
    r = query(http, filters={"source": "alpha' OR '1'='1"})
    assert r.status_code == 200 and r.json()["data"]["pagination"]["total"] == 0
    assert query(http).json()["data"]["pagination"]["total"] == 60


def test_query_needs_a_key(api_url):
    assert httpx.post(f"{api_url}/api/v1/data/query", json={}).status_code == 401


def test_the_total_is_counted_once_until_an_ingestion_commits(http, rows, worker, write_sources, data_dir):
    assert query(http, pagination={"page": 1, "limit": 10}).json()["data"]["pagination"]["total"] == 60
    extra = ValidBatch(pa.array(["x1", "x2"]), {"timestamp": pa.array([T0, T0], pa.timestamp("us", "UTC")),
                                               "value": pa.array([1.0, 2.0], pa.float64())}, {}, np.arange(2))
    seed("gamma", "job_q", extra)  # written behind the API's back: the kept total does not see it
    assert query(http, pagination={"page": 2, "limit": 10}).json()["data"]["pagination"]["total"] == 60
    (data_dir / "d.csv").write_text("id,timestamp,value\nd1,2026-01-01T00:00:00Z,1\nd2,2026-01-01T01:00:00Z,2\n")
    write_sources(f'[sources.delta]\ntype = "file"\nformat = "csv"\npath = "{data_dir}/d.csv"\nprimary_key = ["id"]\n')
    job = http.post("/api/v1/ingestion/start", json={"sources": ["delta"]}).json()["data"]["job_id"]
    wait_for(lambda: http.get(f"/api/v1/jobs/{job}").json()["data"]["state"] == "succeeded", message="the ingestion")
    assert query(http, pagination={"page": 1, "limit": 10}).json()["data"]["pagination"]["total"] == 64
