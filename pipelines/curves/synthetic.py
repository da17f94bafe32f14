"""Synthetic forward curves with a seasonal shape, for the demo, the tests and the benchmark.

Gas peaks in winter; power peaks in summer, with a smaller winter peak; each as-of date re-marks
every curve by a small random walk (seeded: the same call gives the same numbers).

    python -m pipelines.curves.synthetic data/demo/curves   # the demo files `make up` loads
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("curve_key", "asof_date", "contract_month", "tenor_label", "value", "currency", "unit", "asset_class",
           "iso", "location")


@dataclass(frozen=True)
class CurveSpec:
    curve_key: str
    level: float
    winter: float  # swing of the winter peak, as a share of the level
    summer: float  # swing of the summer peak
    unit: str
    asset_class: str
    iso: str
    location: str


DEMO = (
    CurveSpec("NG_HENRY_HUB", 3.4, 0.22, 0.04, "USD/MMBtu", "natural_gas", "", "Henry Hub"),
    CurveSpec("PWR_PJM_WEST_PEAK", 58.0, 0.12, 0.30, "USD/MWh", "power", "PJM", "West Hub"),
    CurveSpec("PWR_PJM_WEST_OFFPEAK", 39.0, 0.10, 0.18, "USD/MWh", "power", "PJM", "West Hub"),
    CurveSpec("PWR_ERCOT_NORTH_PEAK", 61.0, 0.05, 0.55, "USD/MWh", "power", "ERCOT", "North Hub"),
    CurveSpec("PWR_ERCOT_NORTH_OFFPEAK", 33.0, 0.04, 0.25, "USD/MWh", "power", "ERCOT", "North Hub"),
)


def business_days(last: dt.date, count: int) -> list[dt.date]:
    days: list[dt.date] = []
    day = last
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day -= dt.timedelta(days=1)
    return sorted(days)


def month_add(month: dt.date, n: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + n
    return dt.date(index // 12, index % 12 + 1, 1)


def points(specs: tuple[CurveSpec, ...] | list[CurveSpec], asofs: list[dt.date], months: int,
           seed: int = 7) -> Iterator[tuple]:
    """Rows of COLUMNS: every curve on every as-of date, MONTHS contract months from the next month."""
    rng = random.Random(seed)
    for spec in specs:
        drift = 0.0
        for asof in asofs:
            drift += rng.gauss(0, 0.012)
            first = month_add(asof.replace(day=1), 1)
            for n in range(months):
                month = month_add(first, n)
                season = (spec.winter * math.cos(2 * math.pi * (month.month - 1) / 12)
                          + spec.summer * max(math.cos(2 * math.pi * (month.month - 7.5) / 12), 0) ** 2)
                value = spec.level * (1 + drift) * (1 + season) * (1 + 0.004 * n)
                yield (spec.curve_key, asof.isoformat(), month.isoformat()[:7], month.strftime("%b%y"),
                       round(value, 4), "USD", spec.unit, spec.asset_class, spec.iso, spec.location)


def write_demo(folder: Path, last: dt.date = dt.date(2026, 11, 20), days: int = 10, months: int = 36) -> list[Path]:
    """One CSV per as-of date under FOLDER, as a curve vendor would deliver them."""
    folder.mkdir(parents=True, exist_ok=True)
    asofs = business_days(last, days)
    by_day: dict[str, list[tuple]] = {}
    for row in points(DEMO, asofs, months):
        by_day.setdefault(row[1], []).append(row)
    written = []
    for day, rows in by_day.items():
        path = folder / f"curves-{day}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows(rows)
        written.append(path)
    return written


if __name__ == "__main__":
    for written in write_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo/curves")):
        print(written)
