"""Scenario runs: jobs of kind `scenario_run` on the `scenarios` queue.

A run reads its base curves (the scenario's as-of date, or each curve's latest when it starts),
applies the shocks in order with pandas, and computes per-curve and overall metrics. Its outputs and
metrics are written in the same transaction that records it succeeded (`JobRun.final_writes`), so a
killed run leaves nothing behind and its retry writes them once; the same scenario over the same
data gives the same outputs.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from pipelines.auth import quotas
from pipelines.core.db import driver, on_commit, session_scope
from pipelines.core.errors import Conflict, NotFound
from pipelines.core.models import Job, JobKind, JobState, ScenarioMetric
from pipelines.core.pagination import Keyset
from pipelines.ingestion.load import Payload, copy_payload
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


def _base_curves(conn: psycopg.Connection, keys: list[str], asof: dt.date | None) -> pa.Table:
    """The base points of KEYS at ASOF (None: each curve's latest as-of date), in curve and month
    order: one COPY, parsed by Arrow's CSV reader (no Python object per row)."""
    query = ("COPY (SELECT c.curve_key, c.asof_date, c.contract_month, c.tenor_label, c.unit, c.value "
             "FROM curve_index i JOIN curves c ON c.curve_key = i.curve_key "
             "AND c.asof_date = COALESCE(%(asof)s::date, i.last_asof) "
             "WHERE i.curve_key = ANY(%(keys)s) AND c.value IS NOT NULL ORDER BY c.curve_key, c.contract_month) "
             "TO STDOUT (FORMAT csv)")
    with conn.cursor().copy(query, {"keys": keys, "asof": asof}) as copy:
        data = b"".join(bytes(block) for block in copy)
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=list(_BASE_TYPES)),
        convert_options=pacsv.ConvertOptions(column_types=_BASE_TYPES, strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    ).combine_chunks()


_SCENARIO = text("SELECT base, shocks FROM scenarios WHERE id = :id")


def run(job: JobRun) -> dict:
    """One scenario run: shocks over the base curves, outputs and metrics kept with the final state.

    A run is small and quick, so it reports no progress on the way: it reads in one transaction,
    computes, and writes with its end (`JobRun.final_writes`), whose guarded UPDATE also stops a run
    cancelled meanwhile before anything is written."""
    scenario_id = job.params["scenario_id"]
    with job.reading() as connection:
        scenario = connection.execute(_SCENARIO, {"id": scenario_id}).one_or_none()
        if scenario is None:
            raise JobFailed(f"scenario {scenario_id} no longer exists")
        keys, shocks = list(scenario.base["curve_keys"]), list(scenario.shocks)
        asof = dt.date.fromisoformat(scenario.base["asof_date"]) if scenario.base.get("asof_date") else None
        base = _base_curves(driver(connection), keys, asof)
    curve_keys = base["curve_key"].to_numpy(zero_copy_only=False)
    missing = sorted(set(keys) - set(curve_keys))
    if missing:
        when = asof.isoformat() if asof else "its latest as-of date"
        raise JobFailed(f"no base curve for {', '.join(missing)} on {when}")
    values = base["value"].to_numpy()
    months = base["contract_month"].to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is found and named below
        shocked = compute.apply(values, months, shocks)
        change = shocked - values
        per_curve, total = compute.metrics(curve_keys, values, change)
    starts, _ends = compute.curve_bounds(curve_keys)
    if (overflow := compute.beyond_float(curve_keys, starts, months, values, shocked, change, per_curve,
                                         total)) is not None:
        raise JobFailed(overflow)
    job.processed = len(values)

    def write(conn: psycopg.Connection) -> None:
        _write_outputs(conn, job.id, scenario_id, base, starts, shocked, change)
        _write_metrics(conn, job.id, scenario_id, curve_keys[starts], per_curve, total)

    job.final_writes = write
    firsts = pa.array(starts)
    used = zip(curve_keys[starts], base["asof_date"].take(firsts).to_pylist(), strict=True)
    return {"scenario_id": scenario_id, "asof_dates": {key: day.isoformat() for key, day in used},
            "curves": len(starts), "points": len(values), "metrics": total}


def _write_outputs(conn: psycopg.Connection, run_id: str, scenario_id: str, base: pa.Table, starts: np.ndarray,
                   shocked: np.ndarray, change: np.ndarray) -> None:
    """One row per curve (BASE is in curve and month order), its months and values as arrays, with
    one binary COPY encoded from Arrow: each array is a slice of one column, nothing per value. (Written
    only with the run's success, which is final: never twice for one run.)"""
    offsets = pa.array(np.r_[starts, base.num_rows], pa.int32())
    firsts = pa.array(starts)

    def listed(values: pa.Array | np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, values if isinstance(values, pa.Array) else pa.array(values))

    n = len(starts)
    table = pa.table({
        "run_id": pa.repeat(pa.scalar(run_id), n), "scenario_id": pa.repeat(pa.scalar(scenario_id), n),
        "curve_key": base["curve_key"].take(firsts), "asof_date": base["asof_date"].take(firsts),
        "unit": base["unit"].take(firsts), "contract_months": listed(base["contract_month"].chunk(0)),
        "tenor_labels": listed(base["tenor_label"].chunk(0)), "base": listed(base["value"].chunk(0)),
        "shocked": listed(shocked), "change": listed(change),
    })
    encoder = ArrowToPostgresBinaryEncoder(table.schema)
    header = encoder.write_header()  # first: the encoder writes in order
    body = b"".join(encoder.write_batch(batch) for batch in table.to_batches())
    copy_payload(conn, sql.Identifier("scenario_outputs"),
                 Payload((header, body, encoder.finish()), n, tuple(table.column_names)))


_METRICS_COPY = sql.SQL("COPY scenario_metrics (run_id, scenario_id, curve_key, {}) FROM STDIN").format(
    sql.SQL(", ").join(map(sql.Identifier, METRICS)))


def _write_metrics(conn: psycopg.Connection, run_id: str, scenario_id: str, curve_keys: np.ndarray,
                   per_curve: dict[str, np.ndarray], total: dict) -> None:
    """A row per curve and one for the whole run (no curve key); NaN as NULL."""
    columns = [per_curve[name].tolist() for name in METRICS]
    with conn.cursor().copy(_METRICS_COPY) as copy:
        for key, *row in zip(curve_keys.tolist(), *columns, strict=True):
            copy.write_row((run_id, scenario_id, key, *(None if v != v else v for v in row)))
        copy.write_row((run_id, scenario_id, None, *(total[name] for name in METRICS)))


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
