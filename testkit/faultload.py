"""A mixed load for the fault suite, and its ledger.

Each round submits, through the API, an ingestion of a few CSV sources of its own (known good and
bad rows), an export, and a scenario run over curves loaded once at the start, then a backlog of
scenario runs queued behind them (`INGOT_FAULT_BACKLOG`); every job's end is a webhook event to a
local receiver. The ledger is what PostgreSQL and the receiver say was done:

- lost: a submitted job that did not end `succeeded`, a row of its files missing from
  `observations` or `quarantine`, a scenario run without its outputs, or a succeeded job whose event
  never reached the receiver with a 2xx;
- doubled: a row stored twice, a bad row quarantined twice, a run's outputs written twice, or an
  event (webhook-id) received again after the receiver had already answered it 2xx and that answer
  had been recorded;
- repeated: an event received again after a 2xx whose record was lost with a worker killed between
  the answer and its commit (the receiver got more 2xx answers than `webhook_attempts` holds). This is
  the one repeat at-least-once delivery leaves (README, Guarantees: receivers de-duplicate by
  webhook-id); it is counted and shown, not failed.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text

from cli.client import Client
from pipelines.core.db import get_engine
from pipelines.curves import synthetic
from pipelines.curves.synthetic import DEMO
from testkit.curves import CURVES_SOURCE, write_curves
from testkit.datagen import SOURCES, write_csv
from testkit.receiver import Receiver
from testkit.waiting import wait_for

EVENTS = {"ingestion": "ingestion.completed", "export": "export.completed", "scenario_run": "scenario.run.completed"}
SOURCES_PER_ROUND, BAD_EVERY, BATCH = 3, 500, 1000
ROWS = int(os.environ.get("INGOT_FAULT_ROWS", "6000"))  # per source and round; `make faults` raises it
# Scenario runs queued behind each round's three jobs, so every fault also lands on a waiting backlog.
BACKLOG = int(os.environ.get("INGOT_FAULT_BACKLOG", "20"))
CURVE_KEYS = ["NG_HENRY_HUB", "PWR_PJM_WEST_PEAK", "PWR_ERCOT_NORTH_PEAK"]


@dataclass
class Row:
    fault: str
    submitted: int
    succeeded: int
    lost: int
    doubled: int
    recovery_seconds: float
    notes: list[str] = field(default_factory=list)  # what was lost or doubled, when anything was
    repeated: int = 0  # events sent again because a killed worker took the record of their 2xx with it


@dataclass
class Load:
    client: Client
    data_dir: Path
    write_sources: object
    rounds: int
    receiver: Receiver = field(default_factory=Receiver)
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (good rows, bad rows)
    jobs: list[tuple[str, str]] = field(default_factory=list)  # (kind, job id), in submission order
    scenario_id: str = ""
    webhook_secret: str = ""

    def prepare(self) -> None:
        """Every round's files and declarations, the curves loaded, the scenario and the webhook made."""
        declarations = [CURVES_SOURCE.format(glob="curves/*.csv")]
        (self.data_dir / "curves").mkdir()
        write_curves(self.data_dir / "curves" / "c.csv",
                     synthetic.points(DEMO, synthetic.business_days(dt.date(2026, 11, 20), 2), 12))
        for r in range(self.rounds):
            for i in range(SOURCES_PER_ROUND):
                name = f"s{r}_{i}"
                (self.data_dir / name).mkdir()
                good, bad = write_csv(self.data_dir / name / "a.csv", ROWS, bad_every=BAD_EVERY,
                                      start=(r * SOURCES_PER_ROUND + i) * ROWS)
                self.expected[name] = (good, len(bad))
                declarations.append(SOURCES.format(name=name, glob=f"{name}/*.csv"))
        self.write_sources("".join(declarations))
        curves = self.client.wait(self.client.start_ingestion(["curves"])["job_id"], timeout=120)
        assert curves["state"] == "succeeded", curves
        hook = self.client.create_webhook(self.receiver.url, sorted(EVENTS.values()))
        self.webhook_secret = self.receiver.secret = hook["secret"]
        self.scenario_id = self.client.create_scenario({
            "name": "fault load", "base": {"curve_keys": CURVE_KEYS},
            "shocks": [{"type": "parallel", "value": 1.0}, {"type": "percent", "value": -2}]})["scenario_id"]

    def submit(self, round_no: int) -> list[str]:
        """Round ROUND_NO's jobs, submitted (retried while the API answers 503 or cannot be reached)."""
        names = [f"s{round_no}_{i}" for i in range(SOURCES_PER_ROUND)]
        exported = f"s{max(round_no - 1, 0)}_0"  # the last round's: loaded by now, so the export has rows
        # Small batches: the ingestion runs for a second or so, so a fault meant to land mid-job finds it
        # running (a scenario run or an export ends within a few tens of milliseconds).
        made = [("ingestion", self._retry(lambda: self.client.start_ingestion(names, batch_size=BATCH)["job_id"])),
                ("export", self._retry(lambda: self.client.start_export("csv", filters={"source": exported})
                                       ["export_id"])),
                ("scenario_run", self._retry(lambda: self.client.run_scenario(self.scenario_id)["run_id"]))]
        made += [("scenario_run", self._retry(lambda: self.client.run_scenario(self.scenario_id)["run_id"]))
                 for _ in range(BACKLOG)]
        self.jobs += made
        return [job_id for _, job_id in made]

    @staticmethod
    def _retry(call, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return call()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def settle(self, job_ids: list[str], timeout: float = 180, tend=lambda: None) -> float:
        """Wait until every one of JOB_IDS has ended, calling TEND at each look (a supervisor's round);
        seconds it took."""
        began = time.monotonic()

        def ended() -> bool:
            tend()
            with get_engine().connect() as conn:
                left = conn.execute(text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND state NOT IN "
                                         "('succeeded', 'failed', 'cancelled')"), {"ids": job_ids}).scalar_one()
            return left == 0

        try:
            wait_for(ended, timeout=timeout, interval=0.25, message="every job of the round to end")
        except AssertionError:
            with get_engine().connect() as conn:
                states = conn.execute(text("SELECT id, kind, state, attempts, error FROM jobs WHERE id = ANY(:ids)"),
                                      {"ids": job_ids}).all()
            raise AssertionError(f"jobs still not ended after {timeout} s: {states}") from None
        return time.monotonic() - began

    def ledger(self, fault: str, job_ids: list[str], recovery: float) -> Row:
        kinds = dict((job_id, kind) for kind, job_id in self.jobs)
        with get_engine().connect() as conn:
            states = dict(conn.execute(text("SELECT id, state FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids}).all())
            sources = [s for s in self.expected if any(s in (p or []) for p in conn.execute(text(
                "SELECT sources FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids}).scalars())]
            rows = dict(conn.execute(text("SELECT source, count(*) FROM observations WHERE source = ANY(:s) "
                                          "GROUP BY source"), {"s": sources}).all())
            distinct = dict(conn.execute(text("SELECT source, count(DISTINCT id) FROM observations "
                                              "WHERE source = ANY(:s) GROUP BY source"), {"s": sources}).all())
            bad = dict(conn.execute(text("SELECT source, count(*) FROM quarantine WHERE source = ANY(:s) "
                                         "GROUP BY source"), {"s": sources}).all())
            runs = [j for j in job_ids if kinds[j] == "scenario_run"]
            outputs = dict(conn.execute(text("SELECT run_id, count(*) FROM scenario_outputs WHERE run_id = ANY(:r) "
                                             "GROUP BY run_id"), {"r": runs}).all())
        succeeded = [j for j in job_ids if states.get(j) == "succeeded"]
        notes = [f"lost: {j} ended {states.get(j)}" for j in job_ids if j not in succeeded]
        for source in sources:
            good, quarantined = self.expected[source]
            if distinct.get(source, 0) < good or bad.get(source, 0) < quarantined:
                notes.append(f"lost: {source} has {distinct.get(source, 0)}/{good} rows, "
                             f"{bad.get(source, 0)}/{quarantined} quarantined")
            if rows.get(source, 0) > distinct.get(source, 0) or bad.get(source, 0) > quarantined:
                notes.append(f"doubled: {source} has {rows.get(source, 0)} rows for {distinct.get(source, 0)} ids, "
                             f"{bad.get(source, 0)}/{quarantined} quarantined")
        for run in runs:
            if states.get(run) == "succeeded" and outputs.get(run, 0) == 0:
                notes.append(f"lost: run {run} has no outputs")
            if outputs.get(run, 0) > len(CURVE_KEYS):
                notes.append(f"doubled: run {run} has {outputs[run]} outputs")
        answered = self._answered_events()
        notes += [f"lost: the event of {j} was never answered 2xx" for j in succeeded if j not in answered]
        doubled, repeated = self._repeats(self._doubled_events(set(job_ids)))
        notes += [f"doubled: event {e} received again after a recorded 2xx" for e in doubled]
        notes += [f"repeated: event {e} received again, the record of its first 2xx lost with a killed worker"
                  for e in repeated]
        lost = sum(n.startswith("lost") for n in notes)
        return Row(fault, len(job_ids), len(succeeded), lost, len(doubled), round(recovery, 1), notes,
                   len(repeated))

    def wait_for_events(self, job_ids: list[str], timeout: float = 90) -> None:
        """Let the webhook worker deliver the events of JOB_IDS that succeeded (or give up at TIMEOUT)."""
        with get_engine().connect() as conn:
            done = conn.execute(text("SELECT id FROM jobs WHERE id = ANY(:ids) AND state = 'succeeded'"),
                                {"ids": job_ids}).scalars().all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not set(done) <= self._answered_events():
            time.sleep(0.25)

    def _answered_events(self) -> set[str]:
        """The jobs whose event the receiver verified and answered 2xx."""
        return {r["payload"]["data"]["id"] for r in self.receiver.received
                if r["verified"] and 200 <= r["status"] < 300}

    def _repeats(self, events: list[str]) -> tuple[list[str], list[str]]:
        """EVENTS received again after a 2xx, split into those whose every 2xx answer was recorded
        (doubled: sent again after the service knew it had been answered) and those the receiver
        answered 2xx more often than `webhook_attempts` records (repeated: a record lost with a worker
        killed between the answer and its commit)."""
        answered = Counter(r["headers"]["webhook-id"] for r in self.receiver.received
                           if r["verified"] and 200 <= r["status"] < 300)
        doubled, repeated = [], []
        with get_engine().connect() as conn:
            for event in dict.fromkeys(events):
                recorded = conn.execute(text(
                    "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id "
                    "WHERE d.event_id = :e AND a.status_code BETWEEN 200 AND 299"), {"e": event}).scalar_one()
                (repeated if recorded < answered[event] else doubled).append(event)
        return doubled, repeated

    def _doubled_events(self, job_ids: set[str]) -> list[str]:
        """Events received again after an answer of 2xx (a retry after an error or timeout is expected)."""
        seen: Counter[str] = Counter()
        doubled = []
        for r in self.receiver.received:
            if not r["verified"] or r["payload"]["data"]["id"] not in job_ids:
                continue
            event = r["headers"]["webhook-id"]
            if seen[event] > 0:
                doubled.append(event)
            if 200 <= r["status"] < 300:
                seen[event] += 1
        return doubled


def table(rows: list[Row]) -> str:
    head = (f"{'fault':34} {'submitted':>9} {'succeeded':>9} {'lost':>5} {'doubled':>7} {'recovery':>9}"
            + ("  repeated" if any(r.repeated for r in rows) else ""))
    lines = [head, "-" * len(head)]
    lines += [f"{r.fault:34} {r.submitted:9} {r.succeeded:9} {r.lost:5} {r.doubled:7} {r.recovery_seconds:8.1f}s"
              + (f" {r.repeated:9}" if any(x.repeated for x in rows) else "") for r in rows]
    lines += [f"  {r.fault}: {note}" for r in rows for note in r.notes]
    return "\n".join(lines)
