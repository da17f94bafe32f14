"""The merge: COPY into staging, upsert on the key, duplicates removed, unchanged rows untouched."""

import datetime as dt

import numpy as np
import pyarrow as pa
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.ingestion.quarantine import Book
from pipelines.ingestion.sources.files import Reject
from pipelines.ingestion.validate import ValidBatch
from tests.helpers import seed

UTC = dt.UTC


def batch(rows: list[tuple], meta: dict | None = None) -> ValidBatch:
    ids, stamps, values = zip(*rows, strict=True)
    return ValidBatch(
        ids=pa.array(ids, pa.string()),
        fields={"timestamp": pa.array(stamps, pa.timestamp("us", "UTC")), "value": pa.array(values, pa.float64())},
        metadata={k: pa.array(v) for k, v in (meta or {}).items()},
        lines=np.arange(2, 2 + len(rows)),
    )


def merge(b: ValidBatch, job: str = "job_1", source: str = "s") -> None:
    seed(source, job, b)


def table() -> list[tuple]:
    with get_engine().connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT source, id, timestamp, value, metadata, job_id FROM observations ORDER BY source, id"))]


T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)


def test_merge_inserts_then_updates_on_the_key():
    merge(batch([("a", T0, 1.0), ("b", T0, 2.0)], {"hub": ["x", "y"], "mw": [1, None]}))
    assert table() == [("s", "a", T0, 1.0, {"hub": "x", "mw": 1}, "job_1"),
                       ("s", "b", T0, 2.0, {"hub": "y", "mw": None}, "job_1")]
    merge(batch([("b", T0, 2.5), ("c", T0, None)]), job="job_2")
    assert table() == [("s", "a", T0, 1.0, {"hub": "x", "mw": 1}, "job_1"),
                       ("s", "b", T0, 2.5, {}, "job_2"),
                       ("s", "c", T0, None, {}, "job_2")]


def test_remerging_identical_rows_changes_nothing():
    rows = [("a", T0, 1.0), ("b", T0, 2.0)]
    merge(batch(rows), job="job_1")
    with get_engine().connect() as conn:
        before = conn.execute(text("SELECT id, xmin::text, ingested_at FROM observations ORDER BY id")).all()
    merge(batch(rows), job="job_2")
    with get_engine().connect() as conn:
        after = conn.execute(text("SELECT id, xmin::text, ingested_at FROM observations ORDER BY id")).all()
    assert before == after  # not even rewritten: same row versions, same job
    assert {r[5] for r in table()} == {"job_1"}


def test_duplicates_within_a_batch_keep_the_last_line():
    merge(batch([("a", T0, 1.0), ("b", T0, 2.0), ("a", T0, 3.0)]))
    assert [(r[1], r[3]) for r in table()] == [("a", 3.0), ("b", 2.0)]


def test_sources_do_not_collide_on_ids():
    merge(batch([("a", T0, 1.0)]), source="s1")
    merge(batch([("a", T0, 2.0)]), source="s2")
    assert [(r[0], r[3]) for r in table()] == [("s1", 1.0), ("s2", 2.0)]


def test_text_survives_copy_exactly():
    tricky = ['comma, "quote"', "new\nline", "", "ünïcödé ✓", "back\\slash", None]
    merge(batch([(f"r{i}", T0, float(i)) for i in range(len(tricky))], {"note": tricky}))
    assert [r[4]["note"] for r in table()] == tricky


def test_values_survive_the_binary_format():
    """Times finer than PostgreSQL's microseconds are rounded; no time, NaN and infinities survive;
    low-cardinality metadata (encoded once per distinct value) keeps its nulls and escapes."""
    stamps = pa.array([1_767_225_600_000_000_499, 1_767_225_600_000_000_500, None], pa.timestamp("ns", "UTC"))
    region = ["n\"orth", None, "n\"orth"] * 400  # long enough to be dictionary-encoded
    b = ValidBatch(
        ids=pa.array([f"r{i:04d}" for i in range(1200)]),
        fields={"timestamp": pa.concat_arrays([stamps] * 400),
                "value": pa.array([float("nan"), float("inf"), -1.5] * 400)},
        metadata={"region": pa.array(region), "n": pa.array([1, None, 3] * 400, pa.int64())},
        lines=np.arange(1200),
    )
    merge(b)
    got = table()[:3]
    assert [r[2] for r in got] == [T0, T0 + dt.timedelta(microseconds=1), None]
    assert np.isnan(got[0][3]) and got[1][3] == float("inf") and got[2][3] == -1.5
    assert [r[4] for r in got] == [{"region": 'n"orth', "n": 1}, {"region": None, "n": None},
                                   {"region": 'n"orth', "n": 3}]


def test_metadata_of_any_arrow_type_is_stored():
    """Columns with no cast to text (bytes that are not UTF-8, intervals) and dictionary-encoded
    numbers, as Parquet files from other tools hold them, are stored, not a failed job."""
    n = 3
    merge(ValidBatch(
        ids=pa.array(["a", "b", "c"]),
        fields={"timestamp": pa.array([T0] * n, pa.timestamp("us", "UTC")), "value": pa.array([1.0] * n)},
        metadata={"raw": pa.array([b"\xff\x00", b"ok", None], pa.binary()),
                  "every": pa.array([pa.MonthDayNano([1, 2, 3]), None, None], pa.month_day_nano_interval()),
                  "lot": pa.array([5, None, 5]).dictionary_encode()},
        lines=np.arange(n),
    ))
    assert [r[4] for r in table()] == [{"raw": "\\xff00", "every": "[1,2,3]", "lot": 5},
                                       {"raw": "ok", "every": None, "lot": None},
                                       {"raw": None, "every": None, "lot": 5}]


def test_quarantine_records_where_and_why():
    with get_engine().begin() as conn:
        Book("s", "job_1").record(conn.connection.driver_connection, "a.csv",
                                  [Reject(7, "missing required value for 'id'", {"id": None, "px": "1"})],
                                  np.array([], dtype=np.int64))
    with get_engine().connect() as conn:
        row = conn.execute(text("SELECT source, job_id, file, line, reason, raw FROM quarantine")).one()
    assert tuple(row) == ("s", "job_1", "a.csv", 7, "missing required value for 'id'", {"id": None, "px": "1"})
