"""Export benchmark: each format through the API and a worker, beside a raw psycopg
`COPY (SELECT ...) TO STDOUT (FORMAT csv)` of the same rows into a file.

    .venv/bin/python bench/export.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import time

from harness import Bench, csv_source, generate_csv


def raw_copy_out(url: str, path) -> float:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        began = time.perf_counter()
        query = ("COPY (SELECT id, source, timestamp, value, metadata FROM observations ORDER BY id, source) "
                 "TO STDOUT (FORMAT csv)")
        with conn.cursor().copy(query) as copy, path.open("wb") as fh:
            for block in copy:
                fh.write(block)
        return time.perf_counter() - began


def export(bench: Bench, fmt: str) -> tuple[dict, float, int]:
    return bench.track(lambda client: client.start_export(fmt)["export_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    bench = Bench(csv_source("bench", "data/bench.csv"))
    generate_csv(bench.data / "bench.csv", args.rows)
    try:
        bench.start()
        bench.ingest(["bench"])
        (bench.data / "bench.csv").unlink()
        baseline = raw_copy_out(bench.database_url, bench.data / "baseline.csv")
        results = {fmt: export(bench, fmt) for fmt in ("csv", "parquet", "jsonl")}
    finally:
        bench.stop()
    base_rate = args.rows / baseline
    print(f"input: {args.rows:,} rows (id, source, timestamp, value, metadata with 2 keys)")
    print(f"baseline COPY TO STDOUT (csv) {baseline:7.2f} s  {base_rate:12,.0f} rows/s")
    for fmt, (job, seconds, peak) in results.items():
        assert job["result"]["row_count"] == args.rows, job
        rate = args.rows / seconds
        print(f"Ingot export {fmt:<8}         {seconds:7.2f} s  {rate:12,.0f} rows/s  "
              f"{rate / base_rate:5.0%} of baseline  {job['result']['file_size'] / 1e6:7.1f} MB  "
              f"peak RSS {peak / 2**20:.0f} MB  (in the worker {in_worker(job):.2f} s)")


def in_worker(job: dict) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


if __name__ == "__main__":
    main()
