"""Scenario benchmark: 200 curves x 60 contract months x 250 as-of dates (3,000,000 points) stored
through a curves source, then one scenario over all 200 curves with 5 shocks, beside (a) reading the
same base rows with one `COPY ... TO STDOUT` and (b) the same shocks and all four metrics, per curve and
in total, in plain vectorised pandas (named aggregations, no `apply`) on data already in memory, in the
same run.

    .venv/bin/python bench/scenarios.py [--curves 200] [--months 60] [--days 250] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import statistics
import time

from harness import Bench

SOURCE = """
[sources.curves]
type = "file"
format = "csv"
path = "data/*.csv"
dataset = "curves"
[sources.curves.validation]
required_columns = ["curve_key", "asof_date", "contract_month", "value"]
data_types = { asof_date = "date", contract_month = "month", value = "float" }
"""
SHOCKS = [{"type": "parallel", "value": 0.75}, {"type": "percent", "value": -4},
          {"type": "tenor", "from": "2027-06", "to": "2027-09", "value": 3.0},
          {"type": "percent", "value": 2.5}, {"type": "tenor", "from": "2028-01", "to": "2028-12", "value": -1.25}]
BASE_SQL = ("SELECT c.curve_key, c.asof_date, c.contract_month, c.tenor_label, c.unit, c.value "
            "FROM curve_index i JOIN curves c ON c.curve_key = i.curve_key AND c.asof_date = i.last_asof "
            "ORDER BY c.curve_key, c.contract_month")


def write_files(bench: Bench, curves: int, months: int, days: int) -> int:
    from pipelines.curves import synthetic

    specs = [synthetic.CurveSpec(f"PWR_{i:03d}", 30 + i % 50, 0.1 + (i % 7) / 50, 0.2 + (i % 5) / 20, "USD/MWh",
                                 "power", ("PJM", "ERCOT", "CAISO", "MISO")[i % 4], f"Hub {i % 13}")
             for i in range(curves)]
    asofs = synthetic.business_days(dt.date(2026, 11, 20), days)
    by_day: dict[str, list] = {}
    count = 0
    for row in synthetic.points(specs, asofs, months):
        by_day.setdefault(row[1], []).append(row)
        count += 1
    for day, rows in by_day.items():
        with (bench.data / f"curves-{day}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(synthetic.COLUMNS)
            writer.writerows(rows)
    return count


def copy_base(dsn: str) -> tuple[float, bytes]:
    """(a): the base rows read with one COPY, as text."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        began = time.perf_counter()
        buffer = io.BytesIO()
        with conn.cursor().copy(f"COPY ({BASE_SQL}) TO STDOUT") as copy:
            for block in copy:
                buffer.write(block)
        return time.perf_counter() - began, buffer.getvalue()


def plain_pandas(text: bytes) -> float:
    """(b): the same shocks and metrics in plain pandas, on the rows already in memory."""
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(text), sep="\t", header=None,
                        names=["curve_key", "asof_date", "contract_month", "tenor_label", "unit", "value"],
                        parse_dates=["contract_month"])
    began = time.perf_counter()
    shocked = frame["value"].copy()
    for shock in SHOCKS:
        if shock["type"] == "parallel":
            shocked += shock["value"]
        elif shock["type"] == "percent":
            shocked *= 1 + shock["value"] / 100
        else:
            months = frame["contract_month"]
            inside = (months >= shock["from"] + "-01") & (months <= shock["to"] + "-01")
            shocked = shocked.where(~inside, shocked + shock["value"])
    # All four figures per curve and over the whole run, vectorised: named aggregations, no apply.
    frame["change"] = shocked - frame["value"]
    frame["abs_change"] = frame["change"].abs()
    frame["weight"] = frame["value"].abs()
    frame["weighted"] = frame["change"] * frame["weight"]
    frame["pct"] = (100 * frame["change"] / frame["weight"]).where(frame["weight"] > 0)
    per_curve = frame.groupby("curve_key", sort=True).agg(
        mean_change=("change", "mean"), max_abs_change=("abs_change", "max"), mean_pct_change=("pct", "mean"),
        weighted=("weighted", "sum"), weight=("weight", "sum"))
    per_curve["value_weighted_change"] = per_curve["weighted"] / per_curve["weight"].where(per_curve["weight"] > 0)
    _total = (frame["change"].mean(), frame["abs_change"].max(), frame["pct"].mean(),
              frame["weighted"].sum() / frame["weight"].sum())
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=int, default=200)
    parser.add_argument("--months", type=int, default=60)
    parser.add_argument("--days", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    bench = Bench(SOURCE)
    points = write_files(bench, args.curves, args.months, args.days)
    try:
        bench.start()
        bench.quiesce()
        job, load_seconds, _peak = bench.ingest(["curves"])
        assert job["records_processed"] == points, job
        bench.quiesce()
        from cli.client import Client

        with Client(f"http://127.0.0.1:{bench.port}", bench.key) as client:
            keys = [f"PWR_{i:03d}" for i in range(args.curves)]
            scenario = client.create_scenario({"name": "bench", "base": {"curve_keys": keys}, "shocks": SHOCKS})
        dsn = bench.database_url.replace("postgresql+psycopg://", "postgresql://")
        rows = []
        for _ in range(args.repeat):
            run, end_to_end, _peak = bench.track(lambda c: c.run_scenario(scenario["scenario_id"])["run_id"])
            ran = (dt.datetime.fromisoformat(run["finished_at"]) - dt.datetime.fromisoformat(run["started_at"]))
            copy_seconds, text = copy_base(dsn)
            pandas_seconds = plain_pandas(text)
            rows.append((ran.total_seconds(), end_to_end, copy_seconds, pandas_seconds))
    finally:
        bench.stop()
    print(f"input: {args.curves} curves x {args.months} months x {args.days} as-of dates = {points:,} points; "
          f"stored in {load_seconds:.1f} s ({points / load_seconds:,.0f} points/s)")
    print(f"scenario: {len(SHOCKS)} shocks over {args.curves} curves ({args.curves * args.months:,} points)")
    print("round  run (worker)  POST to final   (a) COPY   (b) pandas   run / (a + b)")
    for i, (ran, end_to_end, a, b) in enumerate(rows, 1):
        print(f"{i:>5}  {ran:10.3f} s  {end_to_end:11.3f} s  {a:7.3f} s  {b:9.3f} s  {ran / (a + b):10.2f}")
    ran, a, b = (statistics.median(r[i] for r in rows) for i in (0, 2, 3))
    print(f"median: run {ran:.3f} s against a + b = {a + b:.3f} s: {ran / (a + b):.2f}x (goal: at most 1.5x)")


if __name__ == "__main__":
    main()
