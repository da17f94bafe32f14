"""Scenarios: what-if shocks over forward curves, their runs, outputs, metrics and charts."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api.deps import Admin, Reader, SessionDep, Writer
from api.envelope import Cursor, Envelope, UTCDateTime, found, ok
from api.schemas import JobOut
from pipelines.core.models import JobState, Scenario
from pipelines.jobs import control
from pipelines.scenarios import charts, definitions, runs
from pipelines.scenarios.definitions import ScenarioIn
from worker.dispatch import relay_webhooks, revoke, send_job, send_job_soon

router = APIRouter(prefix="/scenarios", tags=["scenarios"])


class ScenarioOut(BaseModel):
    scenario_id: str
    name: str
    description: str | None
    base: dict[str, Any]
    shocks: list[dict[str, Any]]
    created_at: UTCDateTime

    @classmethod
    def of(cls, s: Scenario) -> ScenarioOut:
        return cls(scenario_id=s.id, name=s.name, description=s.description, base=s.base, shocks=s.shocks,
                   created_at=s.created_at)


class RunOut(JobOut):
    run_id: str
    scenario_id: str

    @classmethod
    def of(cls, job) -> RunOut:
        return cls.model_validate({**JobOut.of(job).model_dump(), "run_id": job.id,
                                   "scenario_id": job.params.get("scenario_id")})


class StateChange(BaseModel):
    model_config = {"extra": "forbid"}

    # Any job state may be asked for; only the moves the contract lists are made (409 otherwise).
    state: JobState
    reason: str | None = Field(default=None, max_length=1000)


class Output(BaseModel):
    curve_key: str
    contract_month: dt.date
    tenor_label: str | None
    base: float
    shocked: float
    change: float


class Outputs(BaseModel):
    run_id: str
    outputs: list[Output]


class Figures(BaseModel):
    mean_change: float | None = None
    max_abs_change: float | None = None
    mean_pct_change: float | None = None
    value_weighted_change: float | None = None


class CurveFigures(Figures):
    curve_key: str


class Metrics(BaseModel):
    run_id: str
    curves: list[CurveFigures]
    total: Figures


def _scenario(session, scenario_id: str) -> Scenario:
    return found(definitions.get(session, scenario_id), f"no scenario '{scenario_id}'")


def _latest_run(session, scenario_id: str) -> str:
    _scenario(session, scenario_id)
    return found(runs.latest_succeeded(session, scenario_id), f"scenario {scenario_id} has no succeeded run")


@router.post("", status_code=201, response_model=Envelope[ScenarioOut])
def create(body: ScenarioIn, request: Request, session: SessionDep, caller: Writer) -> dict:
    """Declare a scenario: base curves (and as-of date, or each curve's latest at run time) and shocks,
    applied in the order given."""
    scenario = definitions.create(session, body, caller.id)
    return ok(request, ScenarioOut.of(scenario), message="scenario created")


class ScenarioList(BaseModel):
    scenarios: list[ScenarioOut]


class RunList(BaseModel):
    runs: list[RunOut]


@router.get("", response_model=Envelope[ScenarioList])
def list_scenarios(request: Request, session: SessionDep, _caller: Reader,
                   limit: Annotated[int, Query(ge=1, le=500)] = 50, cursor: Cursor = None) -> dict:
    rows, next_cursor = definitions.page(session, cursor, limit)
    return ok(request, {"scenarios": [ScenarioOut.of(s) for s in rows]}, next_cursor=next_cursor)


@router.get("/{scenario_id}", response_model=Envelope[ScenarioOut])
def get_scenario(scenario_id: str, request: Request, session: SessionDep, _caller: Reader) -> dict:
    return ok(request, ScenarioOut.of(_scenario(session, scenario_id)))


@router.delete("/{scenario_id}", response_model=Envelope[ScenarioOut])
def delete_scenario(scenario_id: str, request: Request, session: SessionDep, _caller: Writer) -> dict:
    """Delete the scenario and its runs' outputs; 409 while a run is queued or running."""
    scenario = _scenario(session, scenario_id)
    shown = ScenarioOut.of(scenario)
    definitions.remove(session, scenario)
    return ok(request, shown, message="scenario deleted")


@router.post("/{scenario_id}/run", status_code=202, response_model=Envelope[RunOut])
async def run(scenario_id: str, request: Request, caller: Writer) -> dict:
    """Queue a run on the `scenarios` queue; `run_id` is its job id."""
    job = found(await runs.start_now(scenario_id, send_job_soon, request.state.request_id, caller.id),
                f"no scenario '{scenario_id}'")
    return ok(request, RunOut.model_validate({**job, "run_id": job["id"], "scenario_id": scenario_id}),
              message="scenario run queued")


@router.get("/{scenario_id}/runs", response_model=Envelope[RunList])
def list_runs(scenario_id: str, request: Request, session: SessionDep, _caller: Reader,
              limit: Annotated[int, Query(ge=1, le=500)] = 50, cursor: Cursor = None) -> dict:
    _scenario(session, scenario_id)
    rows, next_cursor = runs.page(session, scenario_id, cursor, limit)
    return ok(request, {"runs": [RunOut.of(j) for j in rows]}, next_cursor=next_cursor)


@router.get("/{scenario_id}/runs/{run_id}", response_model=Envelope[RunOut])
def get_run(scenario_id: str, run_id: str, request: Request, session: SessionDep, _caller: Reader) -> dict:
    return ok(request, RunOut.of(found(runs.get(session, run_id, scenario_id), f"no run '{run_id}'")))


@router.post("/runs/{run_id}/cancel", status_code=202, response_model=Envelope[RunOut])
def cancel_run(run_id: str, request: Request, session: SessionDep, _caller: Writer) -> dict:
    """Cancel a run: a queued one at once, a running one at its next check. 409 once it has ended."""
    return _cancel(run_id, request, session)


@router.post("/runs/{run_id}/state", response_model=Envelope[RunOut])
def set_state(run_id: str, body: StateChange, request: Request, session: SessionDep, _caller: Admin) -> dict:
    """Move a run by hand (admin): `cancelled` or `failed` (with a reason) from queued or running,
    `queued` (run it again) from failed or cancelled; anything else 409."""
    if body.state == JobState.CANCELLED:
        return _cancel(run_id, request, session)
    runs.set_state(session, run_id, body.state, body.reason, send_job, relay=relay_webhooks)
    return ok(request, RunOut.of(runs.get(session, run_id)), message=f"run {body.state}")


def _cancel(run_id: str, request: Request, session) -> dict:
    found(runs.get(session, run_id), f"no run '{run_id}'")
    state = control.request_cancel(session, run_id, request.state.request_id, revoke=revoke, relay=relay_webhooks)
    return ok(request, RunOut.of(runs.get(session, run_id)), message=f"run {state}")


@router.get("/{scenario_id}/outputs", response_model=Envelope[Outputs],
            responses={200: {"content": {"text/csv": {}, "image/png": {}}}})
def outputs(scenario_id: str, request: Request, session: SessionDep, _caller: Reader,
            format: Literal["json", "csv", "png"] = "json") -> Any:
    """The latest succeeded run's outputs: JSON, CSV (a header, streamed) or a PNG chart with one
    panel per curve. 404 when no run has succeeded."""
    run_id = _latest_run(session, scenario_id)
    if format == "png":
        title = f"{_scenario(session, scenario_id).name}: base and shocked ({run_id})"
        return Response(charts.render_png(runs.output_frame(session, run_id), title), media_type="image/png")
    if format == "csv":
        return StreamingResponse(_csv(runs.stream_outputs(run_id)), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="{run_id}-outputs.csv"'})
    rows = [{c: getattr(o, c) for c in runs.OUTPUT_COLUMNS} for o in runs.outputs(session, run_id)]
    return ok(request, {"run_id": run_id, "outputs": rows})


def _csv(rows: Iterator) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(runs.OUTPUT_COLUMNS)
    for index, row in enumerate(rows, 1):
        writer.writerow([getattr(row, c) for c in runs.OUTPUT_COLUMNS])
        if index % 2000 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


@router.get("/{scenario_id}/metrics/latest", response_model=Envelope[Metrics])
def latest_metrics(scenario_id: str, request: Request, session: SessionDep, _caller: Reader) -> dict:
    """Per curve and over all curves: mean change, largest absolute change, mean percent change
    (months with a base of 0 left out) and the value-weighted change, of the latest succeeded run."""
    return ok(request, runs.metrics_of(session, _latest_run(session, scenario_id)))
