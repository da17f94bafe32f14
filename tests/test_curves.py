"""Forward curves through a real source, API and worker: load, re-load, list, diff, dimensions (and
their cache), locations, and the indexes the queries stand on."""

import datetime as dt

import pytest
from sqlalchemy import text

from pipelines.core.db import get_engine
from pipelines.curves import queries, synthetic
from pipelines.curves.synthetic import DEMO
from testkit.curves import CURVES_SOURCE, write_curves
from tests.helpers import explain, statements_run


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker


def ingest(client) -> dict:
    job = client.wait(client.start_ingestion(["curves"])["job_id"], timeout=60)
    assert job["state"] == "succeeded", job["error"]
    return job


def count(sql: str, **params) -> int:
    with get_engine().connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


@pytest.fixture
def demo(write_sources, data_dir):
    """Five curves over three as-of dates, twelve months each, one file per date."""
    asofs = synthetic.business_days(dt.date(2026, 11, 20), 3)
    rows = list(synthetic.points(DEMO, asofs, 12))
    for day in asofs:
        write_curves(data_dir / f"c-{day}.csv", [r for r in rows if r[1] == day.isoformat()])
    write_sources(CURVES_SOURCE.format(glob="*.csv"))
    return asofs, rows


def test_curves_load_once_and_a_new_asof_adds_one_curve_per_key(client, worker, demo, data_dir):
    asofs, rows = demo
    job = ingest(client)
    assert job["records_processed"] == len(rows) == 5 * 3 * 12
    assert count("SELECT count(*) FROM curves") == len(rows)
    with get_engine().connect() as conn:
        stored = conn.execute(text("SELECT curve_key, asof_date, contract_month, value, iso FROM curves "
                                   "WHERE curve_key = 'NG_HENRY_HUB' ORDER BY asof_date, contract_month")).all()
    expected = [r for r in rows if r[0] == "NG_HENRY_HUB"]
    assert [(s.asof_date.isoformat(), s.contract_month.isoformat()[:7], s.value) for s in stored] == \
        [(r[1], r[2], r[4]) for r in expected]
    assert all(s.contract_month.day == 1 and s.iso is None for s in stored)  # a gas hub has no ISO

    again = ingest(client)  # the same files: nothing changes
    assert count("SELECT count(*) FROM curves WHERE job_id = :j", j=again["id"]) == 0
    assert count("SELECT count(*) FROM curves") == len(rows)

    later = dt.date(2026, 11, 23)
    write_curves(data_dir / "c-later.csv", synthetic.points(DEMO, [later], 12, seed=11))
    ingest(client)
    assert count("SELECT count(*) FROM curves WHERE asof_date = :d", d=later) == 5 * 12
    assert count("SELECT count(DISTINCT (curve_key, asof_date)) FROM curves") == 5 * 4
    latest = client.request("GET", "/curves", params={"limit": 5000})["data"]
    assert len(latest) == 5 * 12 and {p["asof_date"] for p in latest} == {later.isoformat()}


def test_listing_filters_and_pages_tile(client, worker, demo):
    asofs, rows = demo
    ingest(client)
    first = asofs[0].isoformat()
    seen, cursor = [], None
    for _ in range(20):
        params = {"asof_date": first, "iso": "PJM", "limit": 7, **({"cursor": cursor} if cursor else {})}
        answer = client.request("GET", "/curves", params=params)
        seen += answer["data"]
        cursor = answer["meta"]["next_cursor"]
        if cursor is None:
            break
    expected = sorted((r[0], r[2]) for r in rows if r[1] == first and r[8] == "PJM")
    assert [(p["curve_key"], p["contract_month"][:7]) for p in seen] == expected
    assert all(p["unit"] == "USD/MWh" and p["location"] == "West Hub" for p in seen)


def test_diff_by_hand_with_one_sided_months_and_a_zero_base(client, worker, write_sources, data_dir):
    def row(asof, month, value):
        return ("K", asof, month, month, value, "USD", "USD/MWh", "power", "PJM", "West Hub")

    write_curves(data_dir / "k.csv", [row("2026-11-02", "2027-01", 10), row("2026-11-02", "2027-02", 0),
                                      row("2026-11-02", "2027-03", 5), row("2026-11-03", "2027-01", 12),
                                      row("2026-11-03", "2027-02", 3), row("2026-11-03", "2027-04", 7)])
    write_sources(CURVES_SOURCE.format(glob="*.csv"))
    ingest(client)
    got = client.request("GET", "/curves/diff", params={"curve_key": "K", "asof_a": "2026-11-02",
                                                        "asof_b": "2026-11-03"})["data"]
    assert [(d["contract_month"], d["value_a"], d["value_b"], d["diff_abs"], d["diff_pct"]) for d in got] == [
        ("2027-01-01", 10, 12, 2, 20.0),
        ("2027-02-01", 0, 3, 3, None),  # a zero base: no percentage, no error
        ("2027-03-01", 5, None, None, None),  # on the first date only
        ("2027-04-01", None, 7, None, None),  # on the second date only
    ]
    for params in ({"curve_key": "NOPE", "asof_a": "2026-11-02", "asof_b": "2026-11-03"},
                   {"curve_key": "K", "asof_a": "2026-11-02", "asof_b": "2026-12-01"}):
        answer = client.http.get("/api/v1/curves/diff", params=params)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "NOT_FOUND"


def test_dimensions_count_distinct_curves_and_refresh_after_an_ingestion(client, worker, demo, data_dir):
    ingest(client)
    answer = client.request("GET", "/metadata/dimensions", params={"include_counts": "true"})
    with get_engine().connect() as conn:
        for name in queries.DIMENSIONS:
            truth = conn.execute(text(f"SELECT {name}, count(DISTINCT curve_key) FROM curves "  # noqa: S608
                                      f"WHERE {name} IS NOT NULL GROUP BY 1 ORDER BY 1")).all()
            assert answer["counts"][name] == [{"value": v, "count": n} for v, n in truth]
            assert answer["data"][name] == [v for v, _ in truth]
    assert "counts" not in client.request("GET", "/metadata/dimensions")
    caiso = ("PWR_CAISO_SP15_PEAK", "2026-11-20", "2027-01", "Jan27", 70.0, "USD", "USD/MWh", "power", "CAISO",
             "SP15")
    write_curves(data_dir / "caiso.csv", [caiso])
    ingest(client)
    fresh = client.request("GET", "/metadata/dimensions", params={"include_counts": "true"})
    assert "CAISO" in fresh["data"]["iso"] and {"value": "power", "count": 5} in fresh["counts"]["asset_class"]


def test_locations_have_stable_ids(client, worker, demo):
    asofs, _rows = demo
    ingest(client)
    pjm = client.request("GET", "/locations/iso", params={"iso": "pjm"})["data"]
    assert len(pjm) == 1 and pjm[0]["location"] == "West Hub"
    assert pjm[0]["location_id"] == queries.location_id("PJM", "West Hub")
    assert pjm[0]["curve_keys"] == ["PWR_PJM_WEST_OFFPEAK", "PWR_PJM_WEST_PEAK"]
    assert (pjm[0]["first_asof"], pjm[0]["last_asof"]) == (asofs[0].isoformat(), asofs[-1].isoformat())
    every = client.request("GET", "/locations/iso")["data"]
    assert {(loc["iso"], loc["location"]) for loc in every} == {("PJM", "West Hub"), ("ERCOT", "North Hub")}
    one = client.request("GET", f"/locations/iso/{pjm[0]['location_id']}")["data"]
    assert one == pjm[0]
    assert client.http.get("/api/v1/locations/iso/loc_unknown").status_code == 404


def _plans(call) -> list[str]:
    """The plans of the statements CALL(session) runs, explained with sequential scans priced out (the
    test's tables are tiny: this asks what the plan could stand on, not what it would pick)."""
    from pipelines.core.db import new_session

    with new_session() as session:
        connection = session.connection()
        with statements_run(connection) as statements:
            try:
                call(session)
            except queries.NoCurve:  # no curves stored: the statement was built and run all the same
                pass
        session.execute(text("SET LOCAL enable_seqscan = off"))
        return [explain(connection, statement, parameters) for statement, parameters in statements]


LATEST, ASOF = queries.CurveFilter(), dt.date(2026, 11, 2)


@pytest.mark.parametrize(("call", "indexes"), [
    (lambda s: queries.points(s, queries.CurveFilter(asof_date=ASOF, curve_key="K"), None, 100), ["curves_pkey"]),
    (lambda s: queries.points(s, queries.CurveFilter(iso="pjm"), None, 100),
     ["curves_pkey", "ix_curve_index_lower_iso"]),
    (lambda s: queries.points(s, queries.CurveFilter(asset_class="NATURAL_GAS"), None, 100),
     ["curves_pkey", "ix_curve_index_lower_asset_class"]),
    (lambda s: queries.points(s, queries.CurveFilter(location="west hub"), None, 100),
     ["curves_pkey", "ix_curve_index_lower_location"]),
    (lambda s: queries.diff(s, "K", ASOF, ASOF + dt.timedelta(days=1)), ["curves_pkey"]),
    (lambda s: queries.locations(s, iso="PJM"), ["ix_curve_index_lower_iso"]),
], ids=["points-by-key", "points-by-iso", "points-by-asset-class", "points-by-location", "diff", "locations"])
def test_curve_queries_stand_on_indexes(call, indexes):
    """The statements pipelines/curves/queries.py builds, explained: each reads through an index,
    case-blind filters included (`lower(iso) = lower(:iso)` needs an index of its own)."""
    plans = _plans(call)
    assert plans
    for plan in plans:
        assert "Seq Scan" not in plan, plan
    joined = "\n".join(plans)
    assert all(index in joined for index in indexes), joined
