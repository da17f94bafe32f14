"""Arrays sent to PostgreSQL in its binary form (`pipelines.core.pgarrays`) come back as PostgreSQL reads
them: every value, NULLs and edge values included, with the array's own type."""

import datetime as dt
import math

import numpy as np
import pytest

from pipelines.core import pgarrays
from pipelines.core.db import driver, get_engine


@pytest.fixture
def conn():
    with get_engine().connect() as connection:
        yield driver(connection)


def echo(conn, value) -> tuple:
    return conn.execute("SELECT %s, pg_typeof(%s)::text, cardinality(%s)", (value, value, value)).fetchone()


def test_floats_keep_every_value_including_nan_infinities_and_negative_zero(conn):
    values = np.array([1.5, -2.25, math.nan, math.inf, -math.inf, -0.0, 1e300, 5e-324])
    got, kind, n = echo(conn, pgarrays.float8(values))
    assert kind == "double precision[]" and n == len(values)
    assert [math.copysign(1, v) if v == 0 else v for v in got if not math.isnan(v)] == \
        [math.copysign(1, v) if v == 0 else v for v in values.tolist() if not math.isnan(v)]
    assert math.isnan(got[2])


def test_floats_with_nulls_keep_null_apart_from_nan(conn):
    got, kind, n = echo(conn, pgarrays.floats([1.5, None, math.nan, -math.inf, -0.0, 5e-324]))
    assert kind == "double precision[]" and n == 6
    assert got[:2] == [1.5, None] and math.isnan(got[2]) and got[3:] == [-math.inf, -0.0, 5e-324]
    assert math.copysign(1, got[4]) == -1
    assert echo(conn, pgarrays.floats([]))[0] == []


def test_int4_arrays_hold_32_bits_and_refuse_more(conn):
    got, kind, _ = echo(conn, pgarrays.int4(np.array([1, -(2**31), 2**31 - 1, 0])))
    assert kind == "integer[]" and got == [1, -(2**31), 2**31 - 1, 0]
    with pytest.raises(ValueError, match="32 bits"):
        pgarrays.int4(np.array([2**31]))


def test_dates_before_and_after_postgresqls_epoch(conn):
    days = [dt.date(2000, 1, 1), dt.date(1970, 1, 1), dt.date(1899, 12, 31), dt.date(2027, 12, 1),
            dt.date(9999, 12, 31)]
    got, kind, _ = echo(conn, pgarrays.dates(np.array(days, dtype="datetime64[D]")))
    assert kind == "date[]" and got == days
    with pytest.raises(ValueError, match="cannot hold NULL"):
        pgarrays.dates(np.array(["2027-01-01", "NaT"], dtype="datetime64[D]"))


def test_texts_keep_nulls_empties_quotes_and_any_script(conn):
    words = ["a", None, "", 'q"u,o{t}e\\', "Zürich €", "NULL", "日本語", None, "x" * 5000]
    got, kind, n = echo(conn, pgarrays.texts(words))
    assert kind == "text[]" and n == len(words) and got == words
    assert echo(conn, pgarrays.texts(["no", "null"]))[0] == ["no", "null"]


def test_empty_arrays_are_empty(conn):
    assert echo(conn, pgarrays.float8(np.array([])))[0] == []
    assert echo(conn, pgarrays.texts([]))[0] == []
    assert echo(conn, pgarrays.dates(np.array([], dtype="datetime64[D]")))[0] == []


@pytest.mark.parametrize("copies", [1, 60], ids=["a few groups", "many groups"])
def test_text_groups_are_array_literals_that_give_back_each_group(conn, copies):
    words = ['q"u,o{t}e\\', None, "", "NULL", "Zürich €", "a b", "\\\\", '"', "}", "x"] * copies
    starts = (np.arange(0, len(words), 10)[:, None] + np.array([0, 3, 3, 6])).ravel()  # groups of 3, 0, 3, 4
    offsets = np.r_[starts, len(words)]
    groups = pgarrays.text_groups(words, offsets.tolist())
    assert conn.execute("SELECT cardinality(%s::text[])", (groups,)).fetchone()[0] == len(offsets) - 1
    got = conn.execute("SELECT g::text[] FROM unnest(%s::text[]) WITH ORDINALITY AS u(g, i) ORDER BY i",
                       (groups,)).fetchall()
    assert [row[0] for row in got] == [words[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
