"""Incremental benchmark: append 10% new rows to the file, then time an incremental run beside a full
re-ingest of the same grown file.

    .venv/bin/python bench/incremental.py [--rows 1000000] [--growth 0.1]
"""

from __future__ import annotations

import argparse

from harness import Bench, csv_source, generate_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--growth", type=float, default=0.1)
    args = parser.parse_args()
    added = int(args.rows * args.growth)

    bench = Bench(csv_source("bench", "data/bench.csv", cursor=True))
    path = bench.data / "bench.csv"
    generate_csv(path, args.rows)
    try:
        bench.start()
        _job, first, _ = bench.ingest(["bench"])
        generate_csv(path, added, start=args.rows, append=True)
        incremental, inc_seconds, _ = bench.ingest(["bench"], mode="incremental")
        full, full_seconds, _ = bench.ingest(["bench"], mode="full")
    finally:
        bench.stop()
    total = args.rows + added
    assert full["records_processed"] == total, full
    print(f"input: {args.rows:,} rows loaded ({first:.2f} s), then {added:,} appended ({total:,} in the file)")
    print(f"incremental run: {inc_seconds:6.2f} s  {incremental['records_processed']:>9,} rows loaded  "
          f"{total / inc_seconds:12,.0f} file rows/s")
    print(f"full re-ingest : {full_seconds:6.2f} s  {full['records_processed']:>9,} rows merged  "
          f"{total / full_seconds:12,.0f} file rows/s")
    print(f"incremental / full time: {inc_seconds / full_seconds:.0%}")
    print(f"(time inside the worker: incremental {worker_seconds(incremental):.2f} s, "
          f"full {worker_seconds(full):.2f} s)")


def worker_seconds(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


if __name__ == "__main__":
    main()
