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
import uuid
from collections.abc import Iterator
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

from pipelines.core.db import on_commit, session_scope
from pipelines.core.models import Job, JobKind, JobState, Scenario, ScenarioMetric
from pipelines.core.pagination import Keyset
from pipelines.ingestion.load import Payload, copy_payload
from pipelines.jobs.machine import JobFailed, JobRun, Sender, create_job
from pipelines.scenarios.definitions import parse_month, runs_of

NEWEST_FIRST = Keyset((Job.created_at, Job.id), descending=True)
OUTPUT_COLUMNS = ("curve_key", "contract_month", "tenor_label", "base", "shocked", "change")
METRICS = ("mean_change", "max_abs_change", "mean_pct_change", "value_weighted_change")


class NoSuchRun(LookupError):
    pass


class StateNotAllowed(Exception):
    """The run cannot move to the asked state from the one it is in."""


def start(session: Session, scenario_id: str, send: Sender, request_id: str | None, api_key_id: str | None) -> Job:
    """Queue a run of SCENARIO_ID (locked, so a delete cannot slip in between)."""
    session.get(Scenario, scenario_id, with_for_update=True)
    return create_job(session, kind=JobKind.SCENARIO_RUN, queue="scenarios", params={"scenario_id": scenario_id},
                      send=send, request_id=request_id, api_key_id=api_key_id)


def page(session: Session, scenario_id: str, cursor: str | None, limit: int) -> tuple[list[Job], str | None]:
    return NEWEST_FIRST.page(session, runs_of(scenario_id), cursor, limit)


def get(session: Session, run_id: str, scenario_id: str | None = None) -> Job | None:
    job = session.get(Job, run_id)
    if job is None or job.kind != JobKind.SCENARIO_RUN:
        return None
    return job if scenario_id is None or job.params.get("scenario_id") == scenario_id else None


def set_state(session: Session, run_id: str, state: str, reason: str | None, send: Sender) -> str:
    """An admin's move of a run: `failed` (with REASON) from queued or running, `queued` (run it
    again) from failed or cancelled. NoSuchRun, StateNotAllowed. (`cancelled` goes through
    `pipelines.jobs.control.request_cancel`.)"""
    if get(session, run_id) is None:
        raise NoSuchRun(run_id)
    if state == JobState.FAILED:
        moved = session.execute(text(
            "UPDATE jobs SET state = 'failed', error = :reason, finished_at = now(), lease_id = NULL "
            "WHERE id = :id AND state IN ('queued', 'running') RETURNING id"),
            {"id": run_id, "reason": reason or "marked failed by an admin"}).one_or_none()
    elif state == JobState.QUEUED:
        moved = session.execute(text(
            "UPDATE jobs SET state = 'queued', error = NULL, finished_at = NULL, started_at = NULL, lease_id = NULL, "
            "attempts = 0, progress = 0, result = '{}', checkpoint = '{}', celery_task_id = :task, sent_at = now() "
            "WHERE id = :id AND state IN ('failed', 'cancelled') RETURNING id, kind, queue, celery_task_id"),
            {"id": run_id, "task": str(uuid.uuid4())}).one_or_none()
        if moved is not None:
            snapshot = Job(id=moved.id, kind=moved.kind, queue=moved.queue, celery_task_id=moved.celery_task_id)
            on_commit(session, lambda: send(snapshot))
    else:
        moved = None
    if moved is None:
        current = session.scalar(select(Job.state).where(Job.id == run_id))
        raise StateNotAllowed(f"run {run_id} is {current}: it cannot become {state}")
    return state


# --- the run --------------------------------------------------------------------------------------


def apply(base: pd.DataFrame, shocks: list[dict]) -> pd.Series:
    """BASE's `value` after SHOCKS, in order (BASE has `contract_month` as dates)."""
    shocked = base["value"].astype("float64").copy()
    months = pd.to_datetime(base["contract_month"])
    for shock in shocks:
        if shock["type"] == "parallel":
            shocked += shock["value"]
        elif shock["type"] == "percent":
            shocked *= 1 + shock["value"] / 100
        else:
            inside = (months >= pd.Timestamp(parse_month(shock["from"]))) & \
                     (months <= pd.Timestamp(parse_month(shock["to"])))
            shocked = shocked.where(~inside, shocked + shock["value"])
    return shocked


def curve_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each curve's rows start and end in KEYS (sorted by curve)."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], dtype=int)
    return starts, np.r_[starts[1:], len(keys)].astype(int)


def metrics(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float | None]]:
    """The four figures per curve (a table indexed by curve key) and over all of FRAME (`curve_key`,
    sorted, `base`, `change`); `mean_pct_change` leaves out months whose base is 0. Column-wise, one
    pass per figure whatever the number of curves."""
    keys = frame["curve_key"].to_numpy()
    change = frame["change"].to_numpy(dtype="float64")
    weight = np.abs(frame["base"].to_numpy(dtype="float64"))
    nonzero = weight > 0
    pct = np.where(nonzero, 100 * change / np.where(nonzero, weight, 1.0), 0.0)
    starts, ends = curve_bounds(keys)

    def per(values: np.ndarray, ufunc: np.ufunc = np.add) -> np.ndarray:
        return ufunc.reduceat(values, starts)

    def ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
        return np.divide(top, bottom, out=np.full(len(top), np.nan), where=bottom > 0)

    weighted = change * weight
    per_curve = pd.DataFrame({
        "mean_change": per(change) / (ends - starts),
        "max_abs_change": per(np.abs(change), np.maximum),
        "mean_pct_change": ratio(per(pct), per(nonzero.astype("float64"))),
        "value_weighted_change": ratio(per(weighted), per(weight)),
    }, index=pd.Index(keys[starts], name="curve_key"))
    total = {
        "mean_change": _number(change.mean()),
        "max_abs_change": _number(np.abs(change).max()),
        "mean_pct_change": _number(pct[nonzero].mean()) if nonzero.any() else None,
        "value_weighted_change": _number(weighted.sum() / weight.sum()) if weight.sum() > 0 else None,
    }
    return per_curve, total


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


_BASE_TYPES = {"curve_key": pa.string(), "asof_date": pa.date32(), "contract_month": pa.date32(),
               "tenor_label": pa.string(), "unit": pa.string(), "value": pa.float64()}


def _base_curves(conn: psycopg.Connection, keys: list[str], asof: dt.date | None) -> pd.DataFrame:
    """The base points of KEYS at ASOF (None: each curve's latest as-of date), in key order: one COPY,
    parsed by Arrow's CSV reader (faster than building a Python tuple per row)."""
    query = ("COPY (SELECT c.curve_key, c.asof_date, c.contract_month, c.tenor_label, c.unit, c.value "
             "FROM curve_index i JOIN curves c ON c.curve_key = i.curve_key "
             "AND c.asof_date = COALESCE(%(asof)s::date, i.last_asof) "
             "WHERE i.curve_key = ANY(%(keys)s) AND c.value IS NOT NULL ORDER BY c.curve_key, c.contract_month) "
             "TO STDOUT (FORMAT csv)")
    with conn.cursor().copy(query, {"keys": keys, "asof": asof}) as copy:
        data = b"".join(bytes(block) for block in copy)
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=list(_BASE_TYPES)),
        convert_options=pacsv.ConvertOptions(column_types=_BASE_TYPES, strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    )
    frame = table.to_pandas(date_as_object=True)
    # Plain object columns: the arrays taken from them below are the values as they are, no conversion.
    return frame.astype({"curve_key": object, "tenor_label": object, "unit": object})


def run(job: JobRun) -> dict:
    """One scenario run: shocks over the base curves, outputs and metrics kept with the final state."""
    scenario_id = job.params["scenario_id"]
    with session_scope() as session:
        scenario = session.get(Scenario, scenario_id)
        if scenario is None:
            raise JobFailed(f"scenario {scenario_id} no longer exists")
        keys, shocks = list(scenario.base["curve_keys"]), list(scenario.shocks)
        asof = dt.date.fromisoformat(scenario.base["asof_date"]) if scenario.base.get("asof_date") else None
    with job.batch(processed=0, failed=0, checkpoint={}, progress=10) as conn:  # also: stop if cancelled
        base = _base_curves(conn, keys, asof)
    missing = sorted(set(keys) - set(base["curve_key"]))
    if missing:
        when = asof.isoformat() if asof else "its latest as-of date"
        raise JobFailed(f"no base curve for {', '.join(missing)} on {when}")
    frame = base.assign(base=base["value"].astype("float64"))
    frame["shocked"] = apply(base, shocks)
    frame["change"] = frame["shocked"] - frame["base"]
    per_curve, total = metrics(frame)
    with job.batch(processed=len(frame), failed=0, checkpoint={}, progress=90):
        pass  # a cancel that came while computing stops the run here, before anything is written

    def write(conn: psycopg.Connection) -> None:
        _write_outputs(conn, job.id, scenario_id, frame)
        _write_metrics(conn, job.id, scenario_id, per_curve, total)

    job.final_writes = write
    starts, _ends = curve_bounds(frame["curve_key"].to_numpy())
    used = zip(frame["curve_key"].to_numpy()[starts], frame["asof_date"].to_numpy()[starts], strict=True)
    asof_used = {key: day.isoformat() for key, day in used}
    return {"scenario_id": scenario_id, "asof_dates": asof_used, "curves": len(per_curve), "points": len(frame),
            "metrics": total}


def _copy_frame(conn: psycopg.Connection, table: str, frame: pd.DataFrame) -> None:
    """FRAME into TABLE (its columns by name) with one COPY in CSV (quoted as need be); NaN, None
    and empty text as NULL. Floats are written as repr() does: the same double reads back."""
    text = frame.to_csv(header=False, index=False, na_rep="")
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, frame.columns)))
    with conn.cursor().copy(statement) as copy:
        copy.write(text)


def _write_outputs(conn: psycopg.Connection, run_id: str, scenario_id: str, frame: pd.DataFrame) -> None:
    """One row per curve (FRAME is in curve and month order), its months and values as arrays, with
    one binary COPY encoded from Arrow: each array is a slice of one column, nothing per value."""
    conn.execute("DELETE FROM scenario_outputs WHERE run_id = %s", (run_id,))
    keys = frame["curve_key"].to_numpy()
    starts, _ends = curve_bounds(keys)
    offsets = pa.array(np.r_[starts, len(keys)], pa.int32())

    def listed(name: str, kind: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(frame[name].to_numpy(), kind, from_pandas=True))

    def first(name: str, kind: pa.DataType) -> pa.Array:
        return pa.array(frame[name].to_numpy()[starts], kind, from_pandas=True)

    n = len(starts)
    table = pa.table({
        "run_id": pa.repeat(pa.scalar(run_id), n), "scenario_id": pa.repeat(pa.scalar(scenario_id), n),
        "curve_key": first("curve_key", pa.string()), "asof_date": first("asof_date", pa.date32()),
        "unit": first("unit", pa.string()), "contract_months": listed("contract_month", pa.date32()),
        "tenor_labels": listed("tenor_label", pa.string()), "base": listed("base", pa.float64()),
        "shocked": listed("shocked", pa.float64()), "change": listed("change", pa.float64()),
    })
    encoder = ArrowToPostgresBinaryEncoder(table.schema)
    header = encoder.write_header()  # first: the encoder writes in order
    body = b"".join(encoder.write_batch(batch) for batch in table.to_batches())
    copy_payload(conn, sql.Identifier("scenario_outputs"),
                 Payload((header, body, encoder.finish()), n, tuple(table.column_names)))


def _write_metrics(conn: psycopg.Connection, run_id: str, scenario_id: str, per_curve: pd.DataFrame,
                   total: dict) -> None:
    conn.execute("DELETE FROM scenario_metrics WHERE run_id = %s", (run_id,))
    rows = per_curve.reset_index()
    rows.loc[len(rows)] = [None, *(total[name] for name in METRICS)]  # the total: no curve key
    _copy_frame(conn, "scenario_metrics", rows.assign(run_id=run_id, scenario_id=scenario_id))


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
