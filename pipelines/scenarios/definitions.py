"""Scenarios as declared: which curves, which as-of date, which shocks in which order; checked when
created, so a run never meets a definition it cannot apply.

    {"name": "winter squeeze", "base": {"curve_keys": ["NG_HH"], "asof_date": "2026-11-20"},
     "shocks": [{"type": "parallel", "value": 0.25}, {"type": "percent", "value": 10},
                {"type": "tenor", "from": "2027-01", "to": "2027-02", "value": 1.5}]}
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from pipelines.core.errors import Conflict, Invalid
from pipelines.core.models import ACTIVE_STATES, Job, JobKind, Scenario, ScenarioMetric, ScenarioOutput
from pipelines.core.pagination import Keyset
from pipelines.curves.queries import known_keys, spelt_otherwise

Finite = Annotated[float, Field(allow_inf_nan=False, strict=True)]  # a number: not true, not "1"
NEWEST_FIRST = Keyset((Scenario.created_at, Scenario.id), descending=True)


def parse_month(text: str) -> dt.date:
    """`YYYY-MM` (or a date in the month) as the month's first day; ValueError otherwise."""
    text = text.strip()
    try:
        day = dt.date.fromisoformat(text + "-01" if len(text) == 7 else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a month (YYYY-MM)") from None
    return day.replace(day=1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parallel(_Strict):
    type: Literal["parallel"]
    value: Finite  # added to every contract month


class Percent(_Strict):
    type: Literal["percent"]
    value: Finite  # every contract month multiplied by 1 + value / 100


class Tenor(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["tenor"]
    start: str = Field(alias="from")
    end: str = Field(alias="to")
    value: Finite  # added to the contract months from START to END, both included

    @model_validator(mode="after")
    def _range(self) -> Tenor:
        first, last = parse_month(self.start), parse_month(self.end)
        if first > last:
            raise ValueError(f"the range {self.start}..{self.end} is inverted")
        self.start, self.end = first.isoformat()[:7], last.isoformat()[:7]
        return self


Shock = Annotated[Parallel | Percent | Tenor, Field(discriminator="type")]


class Base(_Strict):
    curve_keys: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=1, max_length=1000)
    asof_date: dt.date | None = None  # None: each curve's latest as-of date when the run starts

    @field_validator("curve_keys")
    @classmethod
    def _once(cls, keys: list[str]) -> list[str]:
        return list(dict.fromkeys(keys))


class ScenarioIn(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    base: Base
    shocks: list[Shock] = Field(min_length=1, max_length=100)


class UnknownCurves(Invalid):
    def __init__(self, keys: list[str], near: dict[str, str] | None = None):
        near = near or {}
        hint = (f" (did you mean {', '.join(f'{near[k]} for {k}' for k in near)}? curve keys match exactly)"
                if near else "")
        super().__init__(f"unknown curve key(s): {', '.join(keys)}{hint}",
                         {"curve_keys": keys, **({"did_you_mean": near} if near else {})})
        self.keys = keys


class ScenarioBusy(Conflict):
    """A run of the scenario is queued or running."""


def create(session: Session, body: ScenarioIn, api_key_id: str | None) -> Scenario:
    """Store BODY as a scenario; UnknownCurves if a curve key names no stored curve."""
    known = known_keys(session, body.base.curve_keys)  # one statement, however many keys
    unknown = [k for k in body.base.curve_keys if k not in known]
    if unknown:
        raise UnknownCurves(unknown, spelt_otherwise(session, unknown))
    scenario = Scenario(name=body.name, description=body.description, base=body.base.model_dump(mode="json"),
                        shocks=[s.model_dump(mode="json", by_alias=True) for s in body.shocks], api_key_id=api_key_id)
    session.add(scenario)
    session.flush()
    return scenario


def get(session: Session, scenario_id: str) -> Scenario | None:
    return session.get(Scenario, scenario_id)


def page(session: Session, cursor: str | None, limit: int) -> tuple[list[Scenario], str | None]:
    return NEWEST_FIRST.page(session, select(Scenario), cursor, limit)


def runs_of(scenario_id: str):
    """A query of the scenario's runs (jobs of kind scenario_run)."""
    return select(Job).where(Job.kind == JobKind.SCENARIO_RUN, Job.params["scenario_id"].astext == scenario_id)


def remove(session: Session, scenario: Scenario) -> None:
    """Delete SCENARIO and its runs' outputs and metrics; ScenarioBusy while a run is queued or running."""
    session.refresh(scenario, with_for_update=True)  # no run starts while this decides
    active = runs_of(scenario.id).where(Job.state.in_(ACTIVE_STATES))
    if session.scalar(select(exists(active.subquery()))):
        raise ScenarioBusy(f"scenario {scenario.id} has a run queued or running; cancel it first")
    session.execute(delete(ScenarioOutput).where(ScenarioOutput.scenario_id == scenario.id))
    session.execute(delete(ScenarioMetric).where(ScenarioMetric.scenario_id == scenario.id))
    session.delete(scenario)
    session.flush()
