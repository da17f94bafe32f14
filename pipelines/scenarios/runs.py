"""Scenario runs: jobs of kind `scenario_run` on the `scenarios` queue.

A run reads its base curves (the scenario's as-of date, or each curve's latest when it starts), with
the statement that claims it when it names a few, applies the shocks in order (NumPy over the columns
it read, `Points`), and computes per-curve and overall metrics. Its outputs and metrics are written by
the very statement that records it succeeded (`JobRun.final_writes`), so a killed run leaves nothing
behind and its retry writes them once; the same scenario over the same data gives the same outputs.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from sqlalchemy import (
    ColumnElement,
    Date,
    Double,
    Insert,
    Integer,
    Select,
    Text,
    any_,
    bindparam,
    case,
    cast,
    func,
    insert,
    select,
    text,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Grouping

from pipelines.auth import quotas
from pipelines.core import pgarrays
from pipelines.core.db import Prepared, driver, on_commit, session_scope
from pipelines.core.errors import Conflict, NotFound
from pipelines.core.models import (
    Curve,
    CurveIndex,
    Job,
    JobKind,
    JobState,
    Scenario,
    ScenarioMetric,
    ScenarioOutput,
)
from pipelines.core.pagination import Keyset
from pipelines.jobs import machine
from pipelines.jobs.attempt import JobFailed, JobRun
from pipelines.jobs.machine import Sender
from pipelines.scenarios import compute
from pipelines.scenarios.compute import METRICS
from pipelines.scenarios.definitions import runs_of

NEWEST_FIRST = Keyset((Job.created_at, Job.id), descending=True)
OUTPUT_COLUMNS = ("curve_key", "contract_month", "tenor_label", "base", "shocked", "change")


class NoSuchRun(NotFound):
    def __init__(self, run_id: str):
        super().__init__(f"no run '{run_id}'")


class StateNotAllowed(Conflict):
    """The run cannot move to the asked state from the one it is in."""


async def start_now(scenario_id: str, send: Sender, request_id: str | None, api_key_id: str | None
                    ) -> dict[str, Any] | None:
    """Queue a run of SCENARIO_ID, on the API's event loop in one statement: the new run as a row, or
    None if there is no such scenario. The scenario is share-locked meanwhile: a delete (which locks it
    exclusively) cannot slip in between, while runs of the same scenario start side by side.
    QuotaExceeded past the key's runs queued or running."""
    if api_key_id is not None:
        await quotas.check_scenario_runs(api_key_id)
    return await machine.create_job_now(kind=JobKind.SCENARIO_RUN, params={"scenario_id": scenario_id}, send=send,
                                        about=("scenarios", scenario_id), request_id=request_id,
                                        api_key_id=api_key_id)


def page(session: Session, scenario_id: str, cursor: str | None, limit: int) -> tuple[list[Job], str | None]:
    return NEWEST_FIRST.page(session, runs_of(scenario_id), cursor, limit)


def get(session: Session, run_id: str, scenario_id: str | None = None) -> Job | None:
    job = session.get(Job, run_id, populate_existing=True)  # as this transaction left it
    if job is None or job.kind != JobKind.SCENARIO_RUN:
        return None
    return job if scenario_id is None or job.params.get("scenario_id") == scenario_id else None


def set_state(session: Session, run_id: str, state: str, reason: str | None, send: Sender,
              relay: Callable[[], object]) -> str:
    """An admin's move of a run: `failed` (with REASON) from queued or running, `queued` (run it
    again) from failed or cancelled; once it commits, a failed run's event is relayed. NoSuchRun,
    StateNotAllowed. (`cancelled` goes through `pipelines.jobs.control.request_cancel`.)"""
    if get(session, run_id) is None:
        raise NoSuchRun(run_id)
    if state == JobState.FAILED:
        moved = machine.fail(session, run_id, reason or "marked failed by an admin")
    elif state == JobState.QUEUED:
        moved = machine.rerun(session, run_id, send)
    else:
        moved = False
    if not moved:
        current = session.scalar(select(Job.state).where(Job.id == run_id))
        raise StateNotAllowed(f"run {run_id} is {current}: it cannot become {state}")
    if state == JobState.FAILED:
        on_commit(session, relay)  # its scenario.run.failed event is ready to go
    return state


# --- the run --------------------------------------------------------------------------------------


_BASE_TYPES = {"curve_key": pa.string(), "asof_date": pa.date32(), "contract_month": pa.date32(),
               "tenor_label": pa.string(), "unit": pa.string(), "value": pa.float64()}


def _base_points(keys: ColumnElement[bool], asof: Any) -> Select:
    """Which points are a run's base, in `_BASE_TYPES`'s columns: those with a value of the curves KEYS
    picks, at ASOF (NULL: each curve's latest as-of date), in curve and month order. One rule for both
    ways a run reads them: with its claim (`SCENARIO`) or by COPY (`_base_curves`)."""
    return select(Curve.curve_key, Curve.asof_date, Curve.contract_month, Curve.tenor_label, Curve.unit,
                  Curve.value).join(CurveIndex, CurveIndex.curve_key == Curve.curve_key) \
        .where(keys, Curve.asof_date == func.coalesce(asof, CurveIndex.last_asof), Curve.value.is_not(None)) \
        .order_by(Curve.curve_key, Curve.contract_month)


# Compiled once (the COPY takes its parameters bound by psycopg, client-side).
_COPY_BASE = "COPY ({}) TO STDOUT (FORMAT csv)".format(Prepared(_base_points(
    CurveIndex.curve_key == any_(bindparam("keys", type_=ARRAY(Text))), bindparam("asof", type_=Date),
)).sql)


@dataclass(frozen=True)
class Points:
    """A run's base points in curve and month order, a column each: the claim's JSON arrays (`_points`)
    or the COPY's Arrow table (`_base_curves`) become the same NumPy arrays, which the run computes on
    and sends back. (Arrow's kernels cost tens of µs each before their first value: most of a small
    run's computation, measured.)"""

    keys: np.ndarray  # object: str
    asofs: np.ndarray  # datetime64[D]
    months: np.ndarray  # datetime64[D]
    labels: list[str | None]
    units: np.ndarray  # object: str or None
    values: np.ndarray  # float64

    def rows(self) -> list[tuple]:
        """The points as rows of `_BASE_TYPES`'s columns (dates as `datetime.date`)."""
        return list(zip(self.keys.tolist(), self.asofs.tolist(), self.months.tolist(), self.labels,
                        self.units.tolist(), self.values.tolist(), strict=True))


def _base_curves(conn: psycopg.Connection, keys: list[str], asof: dt.date | None) -> Points:
    """The base points of KEYS at ASOF (None: each curve's latest as-of date), in curve and month
    order: one COPY, parsed by Arrow's CSV reader (no Python object per number or date)."""
    with conn.cursor().copy(_COPY_BASE, {"keys": keys, "asof": asof}) as copy:
        data = b"".join(bytes(block) for block in copy)
    if not data:  # no points at all (Arrow's reader refuses an empty file): the caller names what is missing
        return _points(None)
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=list(_BASE_TYPES)),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),  # a label may hold one
        # NULL is an empty field, as COPY writes it; "NaN" is a float (Arrow's defaults read it as NULL).
        convert_options=pacsv.ConvertOptions(column_types=_BASE_TYPES, null_values=[""], strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    )

    def column(name: str) -> np.ndarray:
        return table[name].to_numpy(zero_copy_only=False)

    return Points(column("curve_key"), column("asof_date"), column("contract_month"), table["tenor_label"].to_pylist(),
                  column("unit"), column("value"))


# A run's scenario, read by the statement that claims the run (no round trip of its own), and its base
# points too when it names at most CLAIMED_CURVES curves: [base, shocks, points], points an array a
# column (`_BASE_TYPES`'s, in curve and month order) or NULL (none, or more curves than that), or NULL
# if the scenario is gone. A scenario never changes once made, and cannot be deleted while a run of it
# is queued or running. Few curves are most runs, and for them the round trip is most of the read; the
# points of many are read by `_base_curves` (one COPY) instead, which costs PostgreSQL and the worker
# less per point than these arrays do (measured: 0.6 s against 0.8 s for 1,000 curves of 120 months).
CLAIMED_CURVES = 50
# Each array in curve and month order, the order of the sorted subquery they aggregate: one sort (an
# ORDER BY in each aggregate sorts once per array before PostgreSQL 16). A correlated subquery with an
# ORDER BY is neither merged into its parent nor run in parallel, so its rows reach them in order.
_BASE_POINTS = _base_points(
    CurveIndex.curve_key.in_(select(func.jsonb_array_elements_text(Scenario.base["curve_keys"])).correlate(Scenario)),
    Scenario.base["asof_date"].astext.cast(Date),
).correlate(Scenario).subquery("points")
# The values as text, each its shortest exact form: a JSON number would read -0 back as 0, and JSON has
# no NaN or infinity.
_POINTS = select(func.json_build_array(*(func.array_agg(column) for column in _BASE_POINTS.c[:-1]),
                                       func.array_agg(_BASE_POINTS.c.value.cast(Text)))).scalar_subquery()
SCENARIO = select(func.json_build_array(Scenario.base, Scenario.shocks, case(
    (func.jsonb_array_length(Scenario.base["curve_keys"]) <= CLAIMED_CURVES, _POINTS)))) \
    .where(Scenario.id == Job.params["scenario_id"].astext).scalar_subquery()


def _points(columns: list | None) -> Points:
    """The base points the claim read (`SCENARIO`), or none."""
    if columns is None or columns[0] is None:  # no points at all
        columns = [[]] * 6
    keys, asofs, months, labels, units, values = columns
    return Points(np.array(keys, dtype=object), np.array(asofs, dtype="datetime64[D]"),
                  np.array(months, dtype="datetime64[D]"), labels, np.array(units, dtype=object),
                  np.array(values, dtype=np.float64))  # from text, exactly (NaN and -0 too)


def run(job: JobRun) -> dict:
    """One scenario run: shocks over the base curves, outputs and metrics kept with the final state.

    A run is small and quick, so it reports no progress on the way. Its claim has read its scenario,
    and its base curves when it names a few (`SCENARIO`); it computes, and writes with its end
    (`JobRun.final_writes`): one statement, whose guarded UPDATE also stops a run cancelled meanwhile
    before anything is written. Two round trips in all; three over many curves (their COPY)."""
    scenario_id = job.params["scenario_id"]
    if job.subject is None:  # claimed with SCENARIO (worker.tasks.scenarios), which found none
        raise JobFailed(f"scenario {scenario_id} no longer exists")
    definition, shocks, points = job.subject
    keys = list(definition["curve_keys"])
    asof = dt.date.fromisoformat(definition["asof_date"]) if definition.get("asof_date") else None
    if len(keys) <= CLAIMED_CURVES:
        base = _points(points)
    else:
        with job.reading() as connection:
            base = _base_curves(driver(connection), keys, asof)
    curve_keys, values, months = base.keys, base.values, base.months
    missing = sorted(set(keys) - set(curve_keys.tolist()))
    if missing:
        when = asof.isoformat() if asof else "its latest as-of date"
        raise JobFailed(f"no base curve for {', '.join(missing)} on {when}")
    starts, ends = compute.curve_bounds(curve_keys)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found and named below
        shocked = compute.apply(values, months, shocks)
        change = shocked - values
        per_curve, total = compute.metrics(starts, ends, values, change)
    if (overflow := compute.beyond_float(curve_keys, starts, months, values, shocked, change, per_curve,
                                         total)) is not None:
        raise JobFailed(overflow)
    job.processed = len(values)
    keys_used, asofs_used = curve_keys[starts].tolist(), base.asofs[starts]
    # Every array in PostgreSQL's binary form (`pgarrays`): psycopg would dump a list value by value.
    job.final_writes = machine.SuccessWrites(_outputs_and_metrics, {
        "run_id": job.id, "scenario_id": scenario_id,
        # A row per curve: its key, as-of date and unit, and where its points are (from 1, inclusive).
        "curve_keys": pgarrays.texts(keys_used), "asof_dates": pgarrays.dates(asofs_used),
        "units": pgarrays.texts(base.units[starts].tolist()), "firsts": pgarrays.int4(starts + 1),
        "lasts": pgarrays.int4(ends),
        # The points.
        "months": pgarrays.dates(months),
        "tenor_labels": pgarrays.text_groups(base.labels, [*starts.tolist(), len(values)]),  # one a curve
        "base": pgarrays.float8(values), "shocked": pgarrays.float8(shocked), "change": pgarrays.float8(change),
        # The metrics: a row per curve, then one over the run (no curve key); NaN as NULL.
        "metric_keys": pgarrays.texts([*keys_used, None]),
        **{f"metric_{name}": pgarrays.floats([*(None if v != v else v for v in per_curve[name].tolist()), total[name]])
           for name in METRICS},
    })
    return {"scenario_id": scenario_id,
            "asof_dates": {key: day.isoformat() for key, day in zip(keys_used, asofs_used.tolist(), strict=True)},
            "curves": len(starts), "points": len(values), "metrics": total}


def _outputs_and_metrics(succeeded: ColumnElement[bool]) -> tuple[Insert, Insert]:
    """A run's outputs (a row per curve: its slice of the points' arrays) and its metrics, inserted
    from array parameters (`run` names them) where SUCCEEDED holds: written with the run's success,
    which is final, so never twice for one run."""
    def sent(name: str, of: Any) -> Any:  # typed as sent (`pgarrays`): no cast, no bind processing of a list
        return type_coerce(Grouping(bindparam(name)), ARRAY(of))

    curves = func.unnest(sent("curve_keys", Text), sent("asof_dates", Date), sent("units", Text),
                         sent("firsts", Integer), sent("lasts", Integer)
                         ).table_valued("key", "asof", "unit", "first", "last", with_ordinality="n"
                                        ).render_derived(name="curves")

    points = [sent(name, of)[curves.c.first:curves.c.last]
              for name, of in (("base", Double), ("shocked", Double), ("change", Double))]
    outputs = insert(ScenarioOutput).from_select(
        ["run_id", "scenario_id", "curve_key", "asof_date", "unit", "contract_months", "tenor_labels", "base",
         "shocked", "change"],
        select(bindparam("run_id"), bindparam("scenario_id"), curves.c.key, curves.c.asof, curves.c.unit,
               sent("months", Date)[curves.c.first:curves.c.last],
               cast(sent("tenor_labels", Text)[curves.c.n], ARRAY(Text)), *points).where(succeeded))
    figures = func.unnest(sent("metric_keys", Text), *(sent(f"metric_{name}", Double) for name in METRICS)
                          ).table_valued("key", *METRICS).render_derived(name="figures")
    metrics = insert(ScenarioMetric).from_select(
        ["run_id", "scenario_id", "curve_key", *METRICS],
        select(bindparam("run_id"), bindparam("scenario_id"), figures.c.key,
               *(figures.c[name] for name in METRICS)).where(succeeded))
    return outputs, metrics


# --- what a run produced --------------------------------------------------------------------------


def latest_succeeded(session: Session, scenario_id: str) -> str | None:
    """The id of the scenario's last run that succeeded, or None."""
    return session.scalar(runs_of(scenario_id).with_only_columns(Job.id).where(Job.state == JobState.SUCCEEDED)
                          .order_by(Job.finished_at.desc()).limit(1))


_UNNESTED = text(
    "SELECT o.curve_key, u.contract_month, u.tenor_label, u.base, u.shocked, u.change, o.unit "
    "FROM scenario_outputs o, unnest(o.contract_months, o.tenor_labels, o.base, o.shocked, o.change) "
    "AS u(contract_month, tenor_label, base, shocked, change) "
    "WHERE o.run_id = :run ORDER BY o.curve_key, u.contract_month")


def outputs(session: Session, run_id: str) -> Iterator[Any]:
    """The run's outputs, one row per curve and contract month (OUTPUT_COLUMNS and `unit`), streamed."""
    yield from session.execute(_UNNESTED.execution_options(yield_per=5000), {"run": run_id})


def stream_outputs(run_id: str) -> Iterator[Any]:
    """`outputs` in a session of its own, for a response that is still streaming when the request's
    session has closed."""
    with session_scope() as session:
        yield from outputs(session, run_id)


def metrics_of(session: Session, run_id: str) -> dict:
    rows = list(session.scalars(select(ScenarioMetric).where(ScenarioMetric.run_id == run_id)
                                .order_by(ScenarioMetric.curve_key.nulls_last())))
    figures = [{"curve_key": r.curve_key, **{name: getattr(r, name) for name in METRICS}} for r in rows]
    total = next((f for f in figures if f["curve_key"] is None), None)
    return {"run_id": run_id, "curves": [f for f in figures if f["curve_key"] is not None],
            "total": {k: v for k, v in (total or {}).items() if k != "curve_key"}}


def output_frame(session: Session, run_id: str) -> pd.DataFrame:
    """The run's outputs as a table (for charts)."""
    rows = [(o.curve_key, o.contract_month, o.unit, o.base, o.shocked) for o in outputs(session, run_id)]
    return pd.DataFrame(rows, columns=["curve_key", "contract_month", "unit", "base", "shocked"])
