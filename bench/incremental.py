"""Incremental benchmark: append 10% new rows to the file, then time an incremental run beside a full
run of the same grown file (every row read, only changed ones merged) and a forced one (every row
merged, the full re-ingest of old).

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
        forced, forced_seconds, _ = bench.ingest(["bench"], mode="full", force=True)
    finally:
        bench.stop()
    total = args.rows + added
    assert incremental["records_processed"] == added, incremental
    # The incremental run read only the new rows, so the full run reads the file again (a row before
    # the cursor may have been revised) and finds every row as stored.
    assert full["records_processed"] == total and unchanged(full) == total, full
    assert forced["records_processed"] == total and unchanged(forced) == 0, forced
    print(f"input: {args.rows:,} rows loaded ({first:.2f} s), then {added:,} appended ({total:,} in the file)")
    print(f"incremental run: {inc_seconds:6.2f} s  {incremental['records_processed']:>9,} rows loaded  "
          f"{total / inc_seconds:12,.0f} file rows/s")
    print(f"full run       : {full_seconds:6.2f} s  {total:>9,} rows read, {total - unchanged(full):,} merged "
          f"{total / full_seconds:12,.0f} file rows/s")
    print(f"forced full run: {forced_seconds:6.2f} s  {total:>9,} rows merged  "
          f"{total / forced_seconds:12,.0f} file rows/s")
    print(f"incremental / forced full time: {inc_seconds / forced_seconds:.0%}; "
          f"incremental / full: {inc_seconds / full_seconds:.0%}")
    print(f"(time inside the worker: incremental {worker_seconds(incremental):.2f} s, "
          f"full {worker_seconds(full):.2f} s, forced {worker_seconds(forced):.2f} s)")


def unchanged(job: dict) -> int:
    return job["result"]["sources"]["bench"].get("unchanged_rows", 0)


def worker_seconds(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


if __name__ == "__main__":
    main()
