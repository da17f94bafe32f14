"""Scenarios over real curves, run by a real worker: shocks against an independent computation,
metrics against their definitions, every output format, validation, permissions and run states."""

import csv
import datetime as dt
import io
import json
import math
import struct

import pytest
from sqlalchemy import text

from pipelines.core.db import driver, get_engine, session_scope
from pipelines.core.models import Job
from pipelines.curves import synthetic
from pipelines.curves.synthetic import DEMO
from pipelines.scenarios import runs
from testkit.curves import CURVES_SOURCE, write_curves
from tests.helpers import make_key


@pytest.fixture
def worker(shared_worker):
    """This module's tests share one worker (tests/conftest.py)."""
    return shared_worker

SHOCKS = [{"type": "parallel", "value": 1.5}, {"type": "percent", "value": -10},
          {"type": "tenor", "from": "2027-03", "to": "2027-05", "value": 2.0}]
KEYS = ["NG_HENRY_HUB", "PWR_ERCOT_NORTH_PEAK"]


@pytest.fixture
def curves(client, worker, write_sources, data_dir):
    asofs = synthetic.business_days(dt.date(2026, 11, 20), 2)
    write_curves(data_dir / "c.csv", synthetic.points(DEMO, asofs, 12))
    write_sources(CURVES_SOURCE.format(glob="*.csv"))
    job = client.wait(client.start_ingestion(["curves"])["job_id"], timeout=60)
    assert job["state"] == "succeeded", job["error"]
    return asofs


def base_points(asof: dt.date) -> dict:
    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT curve_key, contract_month, value FROM curves WHERE asof_date = :d "
                                 "AND curve_key = ANY(:k)"), {"d": asof, "k": KEYS}).all()
    return {(k, m.isoformat()): v for k, m, v in rows}


def expected_shock(month: str, value: float) -> float:
    shocked = (value + 1.5) * (1 - 10 / 100)
    return shocked + 2.0 if "2027-03-01" <= month <= "2027-05-01" else shocked


def figures(pairs: list[tuple[float, float]]) -> dict:
    """The four metrics by their definitions, from (base, change) pairs."""
    changes = [c for _, c in pairs]
    pct = [100 * c / abs(b) for b, c in pairs if b != 0]
    weight = sum(abs(b) for b, _ in pairs)
    return {"mean_change": sum(changes) / len(changes), "max_abs_change": max(abs(c) for c in changes),
            "mean_pct_change": sum(pct) / len(pct), "value_weighted_change":
            sum(c * abs(b) for b, c in pairs) / weight}


def stored(run_id: str) -> list[tuple]:
    """What RUN_ID wrote, one row per curve and contract month."""
    with session_scope() as session:
        return [tuple(row) for row in runs.outputs(session, run_id)]


def create(client, **overrides) -> dict:
    body = {"name": "winter squeeze", "description": "test", "base": {"curve_keys": KEYS}, "shocks": SHOCKS}
    return client.request("POST", "/scenarios", json={**body, **overrides})["data"]


def run(client, scenario_id: str) -> dict:
    run_id = client.request("POST", f"/scenarios/{scenario_id}/run")["data"]["run_id"]
    job = client.wait(run_id, timeout=60)
    assert job["state"] == "succeeded", job["error"]
    return job


def test_every_shock_type_against_an_independent_computation(client, curves):
    latest = curves[-1]
    scenario = create(client)
    job = run(client, scenario["scenario_id"])
    assert job["result"]["asof_dates"] == {k: latest.isoformat() for k in KEYS}  # the dates it used

    base = base_points(latest)
    outputs = client.request("GET", f"/scenarios/{scenario['scenario_id']}/outputs")["data"]
    assert outputs["run_id"] == job["id"] and len(outputs["outputs"]) == len(base) == 2 * 12
    for row in outputs["outputs"]:
        value = base[(row["curve_key"], row["contract_month"])]
        assert row["base"] == value
        assert math.isclose(row["shocked"], expected_shock(row["contract_month"], value), rel_tol=1e-12)
        assert math.isclose(row["change"], row["shocked"] - row["base"], abs_tol=1e-12)

    metrics = client.request("GET", f"/scenarios/{scenario['scenario_id']}/metrics/latest")["data"]
    by_curve = {m["curve_key"]: m for m in metrics["curves"]}
    for key in KEYS:
        pairs = [(o["base"], o["change"]) for o in outputs["outputs"] if o["curve_key"] == key]
        for name, value in figures(pairs).items():
            assert math.isclose(by_curve[key][name], value, rel_tol=1e-9), (key, name)
    every = [(o["base"], o["change"]) for o in outputs["outputs"]]
    for name, value in figures(every).items():
        assert math.isclose(metrics["total"][name], value, rel_tol=1e-9), name

    got = client.http.get(f"/api/v1/scenarios/{scenario['scenario_id']}/outputs", params={"format": "csv"})
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(got.text)))
    assert [(r["curve_key"], r["contract_month"], float(r["shocked"])) for r in table] == \
        [(o["curve_key"], o["contract_month"], o["shocked"]) for o in outputs["outputs"]]

    picture = client.http.get(f"/api/v1/scenarios/{scenario['scenario_id']}/outputs", params={"format": "png"})
    from PIL import Image

    image = Image.open(io.BytesIO(picture.content))
    assert picture.headers["content-type"] == "image/png" and image.format == "PNG"
    assert image.size == (1040, 340)  # two panels side by side, 5.2 x 3.4 inches each at 100 dpi

    again = run(client, scenario["scenario_id"])  # the same scenario on the same data: the same outputs
    assert stored(again["id"]) == stored(job["id"]) and len(stored(job["id"])) == 24
    with get_engine().connect() as conn:
        events = conn.execute(text("SELECT count(*) FROM webhook_events"))
        assert events.scalar_one() == 0  # no endpoint subscribes: nothing for the relay to do


def test_curves_of_different_lengths_and_odd_labels_keep_each_point_in_its_place(client, worker, write_sources,
                                                                                  data_dir):
    """A run's points travel to PostgreSQL as three flat arrays sliced per curve (`pgarrays`): curves of
    1, 7 and 30 months, a label with quotes, commas, braces and non-ASCII text, a missing label and unit,
    a value of zero and a negative one each come back where they were, with the run's shock applied."""
    asof = dt.date(2026, 11, 20)
    odd = ['"quoted", {braced}', "Zürich €", "", "back\\slash", "— dash"]
    rows = [("A_ONE", asof, "2027-01", "Jan-27", -3.25, "USD", "", "gas", "X", "Y")]
    rows += [("B_SEVEN", asof, f"2027-{m:02d}", odd[m % len(odd)], float(m), "EUR", "EUR/MWh", "power", "X", "Y")
             for m in range(1, 8)]
    rows += [("C_THIRTY", asof, f"{2027 + m // 12}-{m % 12 + 1:02d}", f"M{m}", 0.0 if m == 4 else 10.0 + m, "USD",
              "USD/bbl", "oil", "X", "Y") for m in range(30)]
    rows += [("D_ZERO", asof, "2027-01", "Jan-27", 0.0, "USD", "USD/t", "coal", "X", "Y")]  # no % change to take
    write_curves(data_dir / "odd.csv", rows)
    write_sources(CURVES_SOURCE.format(glob="odd.csv"))
    loaded = client.wait(client.start_ingestion(["curves"])["job_id"], timeout=60)
    assert loaded["state"] == "succeeded", loaded["error"]
    scenario = create(client, base={"curve_keys": ["C_THIRTY", "A_ONE", "D_ZERO", "B_SEVEN"]},
                      shocks=[{"type": "parallel", "value": 1.5}])
    job = run(client, scenario["scenario_id"])
    assert job["result"]["curves"] == 4 and job["result"]["points"] == 39

    expected = sorted((key, dt.date.fromisoformat(month + "-01"), label or None, value, value + 1.5, 1.5, unit or None)
                      for key, _, month, label, value, _, unit, *_ in rows)
    got = [(key, month, label, base, shocked, change, unit) for key, month, label, base, shocked, change, unit
           in stored(job["id"])]
    assert got == expected
    metrics = client.request("GET", f"/scenarios/{scenario['scenario_id']}/metrics/latest")["data"]
    by_curve = {m["curve_key"]: m for m in metrics["curves"]}
    assert sorted(by_curve) == ["A_ONE", "B_SEVEN", "C_THIRTY", "D_ZERO"]
    assert metrics["total"]["mean_change"] == 1.5 and metrics["total"]["max_abs_change"] == 1.5
    # A curve whose every base is 0 has no percentage change or weight: NULL, not NaN, and kept apart
    # from its neighbours' figures.
    assert by_curve["D_ZERO"]["mean_pct_change"] is None and by_curve["D_ZERO"]["value_weighted_change"] is None
    assert by_curve["D_ZERO"]["mean_change"] == 1.5 and by_curve["A_ONE"]["mean_pct_change"] == 100 * 1.5 / 3.25


def test_a_curve_key_in_the_wrong_case_is_refused_pointing_at_the_stored_one(client, curves):
    from cli.client import IngotError

    with pytest.raises(IngotError) as refused:
        create(client, base={"curve_keys": ["ng_henry_hub", "NO_SUCH_CURVE", KEYS[1]]})
    assert refused.value.status == 422
    assert refused.value.message == ("unknown curve key(s): ng_henry_hub, NO_SUCH_CURVE "
                                     "(did you mean NG_HENRY_HUB for ng_henry_hub? curve keys match exactly)")
    assert refused.value.details == {"curve_keys": ["ng_henry_hub", "NO_SUCH_CURVE"],
                                     "did_you_mean": {"ng_henry_hub": "NG_HENRY_HUB"}}


def test_shocks_past_the_largest_float_fail_the_run_clearly_and_write_nothing(client, curves):
    """Two shocks of +1e300% each are valid numbers, but take every value past 1.8e308: the run fails
    naming the first curve and month, instead of failing to record its infinities and being left running."""
    scenario = create(client, shocks=[{"type": "percent", "value": 1e300}, {"type": "percent", "value": 1e300}])
    run_id = client.request("POST", f"/scenarios/{scenario['scenario_id']}/run")["data"]["run_id"]
    job = client.wait(run_id, timeout=60)
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert f"the shocks take {sorted(KEYS)[0]} " in job["error"] and "use smaller shock values" in job["error"]
    assert stored(run_id) == []
    # A large but finite scenario still runs.
    big = create(client, shocks=[{"type": "percent", "value": 1e200}])
    assert run(client, big["scenario_id"])["state"] == "succeeded"


def test_a_fixed_asof_date_is_used_as_given(client, curves):
    first = curves[0]
    scenario = create(client, base={"curve_keys": ["NG_HENRY_HUB"], "asof_date": first.isoformat()},
                      shocks=[{"type": "parallel", "value": 1}])
    job = run(client, scenario["scenario_id"])
    assert job["result"]["asof_dates"] == {"NG_HENRY_HUB": first.isoformat()}
    outputs = client.request("GET", f"/scenarios/{scenario['scenario_id']}/outputs")["data"]["outputs"]
    base = {m: v for (k, m), v in base_points(first).items() if k == "NG_HENRY_HUB"}
    assert {o["contract_month"]: o["base"] for o in outputs} == base


BAD = [
    ("unknown curve key", {"base": {"curve_keys": ["NOPE"]}}),
    ("no curve", {"base": {"curve_keys": []}}),
    ("no shock", {"shocks": []}),
    ("inverted range", {"shocks": [{"type": "tenor", "from": "2027-06", "to": "2027-01", "value": 1}]}),
    ("unparseable range", {"shocks": [{"type": "tenor", "from": "June", "to": "2027-01", "value": 1}]}),
    ("unknown shock", {"shocks": [{"type": "twist", "value": 1}]}),
    ("not a number", {"shocks": [{"type": "parallel", "value": "NaN"}]}),
    ("infinite", {"shocks": [{"type": "percent", "value": "Infinity"}]}),
]


@pytest.mark.parametrize("change", [c for _, c in BAD], ids=[n for n, _ in BAD])
def test_bad_definitions_are_refused_in_the_envelope(client, change):
    with get_engine().begin() as conn:
        conn.execute(text("INSERT INTO curve_index (curve_key, first_asof, last_asof) "
                          "VALUES ('NG_HENRY_HUB', '2026-11-02', '2026-11-02')"))
    body = {"name": "bad", "base": {"curve_keys": ["NG_HENRY_HUB"]}, "shocks": [{"type": "parallel", "value": 1}],
            **change}
    raw = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")  # as JSON's extensions
    answer = client.http.post("/api/v1/scenarios", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["success"] is False and answer.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.fixture
def queued_run(client, no_worker):
    """A scenario over one stored curve, and a run of it that no worker takes."""
    with get_engine().begin() as conn:
        conn.execute(text("INSERT INTO curve_index (curve_key, first_asof, last_asof) VALUES ('K', '2026-11-02', "
                          "'2026-11-02')"))
    scenario = create(client, base={"curve_keys": ["K"]}, shocks=[{"type": "parallel", "value": 1}])
    run_id = client.request("POST", f"/scenarios/{scenario['scenario_id']}/run")["data"]["run_id"]
    return scenario["scenario_id"], run_id


def test_run_states_follow_the_contract(client, queued_run):
    scenario_id, run_id = queued_run

    def move(state, reason=None):
        return client.http.post(f"/api/v1/scenarios/runs/{run_id}/state", json={"state": state, "reason": reason})

    assert move("queued").status_code == 409  # queued from queued
    assert client.http.delete(f"/api/v1/scenarios/{scenario_id}").status_code == 409  # a run is queued
    failed = move("failed", "stuck on a lost host")
    assert failed.status_code == 200 and failed.json()["data"]["state"] == "failed"
    assert client.request("GET", f"/scenarios/{scenario_id}/runs/{run_id}")["data"]["error"] == "stuck on a lost host"
    assert move("failed").status_code == 409 and move("cancelled").status_code == 409
    assert move("queued").json()["data"]["state"] == "queued"
    cancelled = client.http.post(f"/api/v1/scenarios/runs/{run_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["data"]["state"] == "cancelled"
    assert client.http.post(f"/api/v1/scenarios/runs/{run_id}/cancel").status_code == 409
    assert move("queued").json()["data"]["state"] == "queued"
    assert move("cancelled").json()["data"]["state"] == "cancelled"
    for never in ("succeeded", "running", "cancelling"):  # states no one may set: 409, as the contract says
        assert move(never).status_code == 409 and move(never).json()["error"]["code"] == "CONFLICT"
    assert move("sideways").status_code == 422  # not a state at all
    runs = client.request("GET", f"/scenarios/{scenario_id}/runs")["data"]["runs"]
    assert [r["run_id"] for r in runs] == [run_id]
    assert client.http.get(f"/api/v1/scenarios/{scenario_id}/outputs").status_code == 404  # none succeeded
    assert client.http.delete(f"/api/v1/scenarios/{scenario_id}").status_code == 200
    assert client.http.get(f"/api/v1/scenarios/{scenario_id}").status_code == 404


def test_state_changes_are_admin_only_and_a_read_key_cannot_create_or_run(api_url, queued_run):
    from cli.client import Client

    scenario_id, run_id = queued_run
    with Client(api_url, make_key(["read"])) as reader:
        assert reader.http.get(f"/api/v1/scenarios/{scenario_id}").status_code == 200
        body = {"name": "x", "base": {"curve_keys": ["K"]}, "shocks": [{"type": "parallel", "value": 1}]}
        assert reader.http.post("/api/v1/scenarios", json=body).status_code == 403
        assert reader.http.post(f"/api/v1/scenarios/{scenario_id}/run").status_code == 403
    with Client(api_url, make_key(["write"])) as writer:
        moved = writer.http.post(f"/api/v1/scenarios/runs/{run_id}/state", json={"state": "failed"})
        assert moved.status_code == 403


def _sent(trace) -> int:
    """Round trips a libpq protocol trace saw begin: each statement ends with a Sync (extended protocol)
    or is a Query (simple protocol, as a COPY is)."""
    lines = trace.read_text().splitlines()
    return sum(1 for line in lines if "\tF\t" in line and ("\tSync" in line or "\tQuery" in line))


@pytest.fixture
def traced(tmp_path):
    """Each checkout of a pooled connection meanwhile traced (libpq's protocol trace), a file each."""
    from sqlalchemy import event

    traces, open_files = [], {}

    def start(live, record, proxy):  # LIVE: the psycopg connection
        traces.append(tmp_path / f"trace-{len(traces)}-{id(live)}")
        open_files[id(live)] = out = open(traces[-1], "w")  # noqa: SIM115 (closed at check-in)
        live.pgconn.trace(out.fileno())

    def stop(live, record):
        out = open_files.pop(id(live), None) if live is not None else None
        if out is not None:
            live.pgconn.untrace()
            out.close()

    engine = get_engine()
    event.listen(engine, "checkout", start)
    event.listen(engine, "checkin", stop)
    yield traces
    event.remove(engine, "checkout", start)
    event.remove(engine, "checkin", stop)


def test_a_run_is_two_round_trips_and_fails_clearly_if_its_scenario_is_gone(client, queued_run, traced):
    """The claim reads the run's scenario and its base curves in the same statement: a run is two round
    trips, its claim and its end (which writes the outputs). A scenario deleted behind the API's back
    fails the run by name."""
    from pipelines.core.roundtrips import RoundTrips
    from worker.tasks.scenarios import run as run_task

    scenario_id, run_id = queued_run
    with RoundTrips() as trips:
        assert run_task(run_id) == "failed"  # curve K has no points
    assert trips.statements == 2
    assert client.job(run_id)["error"] == "no base curve for K on its latest as-of date"

    with get_engine().begin() as conn:
        conn.execute(text("INSERT INTO curves (curve_key, asof_date, contract_month, tenor_label, value, source) "
                          "VALUES ('K', '2026-11-02', '2027-01-01', 'Jan27', 40.5, 't'), "
                          "('K', '2026-11-02', '2027-02-01', 'Feb27', 41.25, 't')"))
    assert client.http.post(f"/api/v1/scenarios/runs/{run_id}/state", json={"state": "queued"}).status_code == 200
    traced.clear()
    assert run_task(run_id) == "succeeded"
    assert [_sent(trace) for trace in traced] == [2]  # one connection: the claim with the curves, the end
    assert client.job(run_id)["result"]["points"] == 2
    with get_engine().connect() as conn:
        shocked = conn.execute(text("SELECT shocked FROM scenario_outputs WHERE run_id = :r"), {"r": run_id})
        assert shocked.scalar_one() == [41.5, 42.25]

    again = client.request("POST", f"/scenarios/{scenario_id}/run")["data"]["run_id"]
    with get_engine().begin() as conn:  # the API refuses while a run is queued; SQL does not
        conn.execute(text("DELETE FROM scenarios WHERE id = :s"), {"s": scenario_id})
    assert run_task(again) == "failed"
    assert client.job(again)["error"] == f"scenario {scenario_id} no longer exists"


def test_the_points_a_claim_reads_are_the_stored_ones_bit_for_bit(client, no_worker):
    """The base curves come with the claim as JSON arrays: every float (NaN and infinities, which JSON
    cannot hold, among them), date and label reads back exactly as stored, in curve and month order,
    each curve at its own latest as-of date unless the scenario fixes one."""
    from sqlalchemy import select

    values = [0.1 + 0.2, 1e308, -5e-324, math.nan, math.inf, -math.inf, 123456789.123456789, -0.0]
    with get_engine().begin() as conn:
        for key, asof in (("B,\"x\"", "2026-11-03"), ("A", "2026-11-02")):
            conn.execute(text("INSERT INTO curve_index (curve_key, first_asof, last_asof) VALUES (:k, :d, :d)"),
                         {"k": key, "d": asof})
            for n, value in enumerate(values):  # months inserted last to first: the read must sort them
                month = dt.date(2027 + (len(values) - n) // 12, (len(values) - n) % 12 + 1, 1)
                conn.execute(text("INSERT INTO curves (curve_key, asof_date, contract_month, tenor_label, unit, "
                                  "value, source) VALUES (:k, :d, :m, :l, :u, :v, 't'), (:k, '2026-10-01', :m, "
                                  "'old', NULL, 0, 't')"),
                             {"k": key, "d": asof, "m": month, "l": f"M{n}, \"q\"\n", "u": "$/MWh" if n else None,
                              "v": value})
        conn.execute(text("INSERT INTO curves (curve_key, asof_date, contract_month, value, source) "
                          "VALUES ('A', '2026-11-02', '2030-01-01', NULL, 't')"))  # no value: not a point
    latest = text("SELECT curve_key, asof_date, contract_month, tenor_label, unit, value FROM curves c "
                  "WHERE asof_date = COALESCE(CAST(:fixed AS date), (SELECT last_asof FROM curve_index i "
                  "WHERE i.curve_key = c.curve_key)) AND value IS NOT NULL ORDER BY curve_key, contract_month")
    for fixed in (None, "2026-10-01"):
        base = {"curve_keys": ["B,\"x\"", "A", "A"], **({"asof_date": fixed} if fixed else {})}
        scenario = create(client, base=base, shocks=[{"type": "parallel", "value": 1}])
        run_id = client.request("POST", f"/scenarios/{scenario['scenario_id']}/run")["data"]["run_id"]
        with get_engine().connect() as conn:
            expected = [tuple(row) for row in conn.execute(latest, {"fixed": fixed})]
            _, _, columns = conn.execute(select(runs.SCENARIO).where(Job.id == run_id)).scalar_one()
            copied = runs._base_curves(driver(conn), base["curve_keys"], fixed and dt.date.fromisoformat(fixed))
        for read in (runs._points(columns), copied):  # with the claim (a few curves), by COPY (many)
            assert (read.keys.dtype, read.asofs.dtype, read.months.dtype, read.values.dtype) == \
                (object, "datetime64[D]", "datetime64[D]", "float64")
            got = read.rows()
            assert len(got) == len(expected) == 16
            for row, want in zip(got, expected, strict=True):
                assert row[:5] == want[:5]
                same = struct.pack("<d", row[5]) == struct.pack("<d", want[5])  # -0.0 too
                assert same or (math.isnan(row[5]) and math.isnan(want[5]))


def test_a_run_over_many_curves_reads_them_by_copy(client, no_worker, traced):
    """Past CLAIMED_CURVES curves the claim leaves the points out and the run reads them in one COPY:
    three round trips, the same outputs."""
    from worker.tasks.scenarios import run as run_task

    keys = [f"C{n:03d}" for n in range(runs.CLAIMED_CURVES + 1)]
    with get_engine().begin() as conn:
        for n, key in enumerate(keys):
            conn.execute(text("INSERT INTO curve_index (curve_key, first_asof, last_asof) VALUES (:k, :d, :d)"),
                         {"k": key, "d": dt.date(2026, 11, 2)})
            conn.execute(text("INSERT INTO curves (curve_key, asof_date, contract_month, tenor_label, value, "
                              "source) VALUES (:k, '2026-11-02', '2027-01-01', 'Jan27', :v, 't')"),
                         {"k": key, "v": float(n)})
    scenario = create(client, base={"curve_keys": keys}, shocks=[{"type": "parallel", "value": 0.5}])
    run_id = client.request("POST", f"/scenarios/{scenario['scenario_id']}/run")["data"]["run_id"]
    traced.clear()
    assert run_task(run_id) == "succeeded"
    assert [_sent(trace) for trace in traced] == [3]  # the claim, the COPY, the end
    with get_engine().connect() as conn:
        shocked = dict(conn.execute(text("SELECT curve_key, shocked[1] FROM scenario_outputs WHERE run_id = :r"),
                                    {"r": run_id}).all())
    assert shocked == {key: n + 0.5 for n, key in enumerate(keys)}


def _blocked_run(client, scenario_id: str, lock_conn, table: str = "scenario_outputs") -> str:
    """Start a run while LOCK_CONN holds TABLE. The outputs: the run claims its job (reading its curves
    with it) and computes, then its end, which writes the outputs, waits on the lock. The curves: the
    claim itself waits, the job still queued."""
    from tests.helpers import wait_for

    lock_conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
    run_id = client.request("POST", f"/scenarios/{scenario_id}/run")["data"]["run_id"]
    statement = "INSERT INTO scenario_outputs" if table == "scenario_outputs" else "UPDATE jobs SET state"

    def waiting() -> int:  # a new transaction each time: pg_stat_activity is a snapshot per transaction
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE :q"), {"q": f"%{statement}%"}).scalar_one()

    wait_for(waiting, timeout=30, message=f"the run to wait on {table}")
    return run_id


def test_a_running_run_stops_at_its_next_check_when_cancelled(client, curves):
    scenario = create(client)
    with get_engine().connect() as lock_conn, lock_conn.begin():
        run_id = _blocked_run(client, scenario["scenario_id"], lock_conn)
        assert client.job(run_id)["state"] == "running"
        answer = client.http.post(f"/api/v1/scenarios/runs/{run_id}/cancel")
        assert answer.status_code == 202 and answer.json()["data"]["state"] == "cancelling"
    job = client.wait(run_id, timeout=60)
    assert job["state"] == "cancelled"
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM scenario_outputs WHERE run_id = :r"),
                            {"r": run_id}).scalar_one() == 0


def test_a_worker_killed_mid_run_leaves_one_set_of_outputs_equal_to_an_undisturbed_run(client, curves,
                                                                                       start_worker, worker):
    scenario = create(client)
    calm = run(client, scenario["scenario_id"])
    with get_engine().connect() as lock_conn, lock_conn.begin():
        run_id = _blocked_run(client, scenario["scenario_id"], lock_conn, "curves")
        worker.kill()  # the whole worker, SIGKILL, while its claim waits on the curves
    # Its server process, still waiting, takes the job for the dead worker once the lock goes: the
    # worker started next finds its owner dead and takes it over.
    start_worker()
    job = client.wait(run_id, timeout=90)
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert stored(run_id) == stored(calm["id"]) and len(stored(run_id)) == 24
    with get_engine().connect() as conn:
        metrics = conn.execute(text("SELECT count(*) FROM scenario_metrics WHERE run_id = :r"), {"r": run_id})
        assert metrics.scalar_one() == len(KEYS) + 1
