"""Ingestion benchmark: raw psycopg COPY of a CSV versus Ingot's end-to-end ingestion of it.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--batch-size N] [--repeat 3]

Both run in one process against the same PostgreSQL (embedded): (a) `COPY ... FROM STDIN` into a
bare table; (b) POST /ingestion/start through the real API to a real worker, timed until the job has
succeeded. Prints rows/s for both, the ratio b/a, and the peak RSS of the worker's pool process.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import time
from pathlib import Path

from harness import Bench, csv_source, generate_csv, resting_pool_memory


def raw_copy(url: str, path: Path) -> float:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute("CREATE TABLE bench_raw (id text, timestamp timestamptz, value double precision, "
                     "region text, quality bigint)")
        conn.commit()
        began = time.perf_counter()
        with conn.cursor().copy("COPY bench_raw FROM STDIN (FORMAT csv, HEADER)") as copy, path.open("rb") as fh:
            while block := fh.read(1 << 20):
                copy.write(block)
        conn.commit()
        elapsed = time.perf_counter() - began
        conn.execute("DROP TABLE bench_raw")
        conn.commit()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; medians are compared")
    args = parser.parse_args()

    names = [f"bench{i}" for i in range(args.repeat)]
    gzipped = [f"gz{i}" for i in range(args.repeat)]
    bench = Bench("".join(csv_source(name, "data/bench.csv") for name in names)
                  + "".join(csv_source(name, "data/bench.csv.gz") for name in gzipped))
    path = bench.data / "bench.csv"
    print(f"generating {args.rows:,} rows ...", flush=True)
    generate_csv(path, args.rows)
    with path.open("rb") as plain, gzip.open(path.with_suffix(".csv.gz"), "wb", compresslevel=6) as packed:
        shutil.copyfileobj(plain, packed, 1 << 20)
    megabytes = path.stat().st_size / 1e6
    gz_megabytes = path.with_suffix(".csv.gz").stat().st_size / 1e6
    copies, runs, peaks, privates, gz_runs = [], [], [], [], []
    try:
        bench.start()
        resting, shared = resting_pool_memory(bench)
        for name in names:
            bench.quiesce()
            copies.append(raw_copy(bench.database_url, path))
            bench.quiesce()
            # Each run is a source's first load, as when a newcomer ingests a file.
            job, seconds, peak = bench.ingest([name], batch_size=args.batch_size)
            assert job["records_processed"] == args.rows, job
            runs.append(seconds)
            peaks.append(peak)
            privates.append(bench.private_peak)
            bench.quiesce()
            gz_job, gz_seconds, _peak = bench.ingest([gzipped[len(runs) - 1]], batch_size=args.batch_size)
            assert gz_job["records_processed"] == args.rows, gz_job
            gz_runs.append(gz_seconds)
            print(f"  run {len(runs)}: raw COPY {copies[-1]:.2f} s, Ingot {seconds:.2f} s, "
                  f"Ingot from .csv.gz {gz_seconds:.2f} s", flush=True)
        # Re-runs over the loaded source: the file unchanged (skipped by its fingerprint), the same
        # file forced through (the merge path, nothing changes), and the file with 1% of rows changed.
        bench.quiesce()
        again_job, again, _peak = bench.ingest([names[0]], batch_size=args.batch_size)
        assert again_job["records_processed"] == 0 and again_job["result"]["sources"][names[0]]["unchanged"]
        bench.quiesce()
        forced_job, forced, _peak = bench.ingest([names[0]], batch_size=args.batch_size, force=True)
        assert forced_job["records_processed"] == args.rows, forced_job
        change_one_percent(path)
        bench.quiesce()
        changed_job, changed, _peak = bench.ingest([names[0]], batch_size=args.batch_size)
        assert changed_job["records_processed"] == args.rows, changed_job
    finally:
        bench.stop()
    copy_seconds, seconds = statistics.median(copies), statistics.median(runs)
    copy_rate, rate = args.rows / copy_seconds, args.rows / seconds
    print(f"input: {args.rows:,} rows, {megabytes:.0f} MB CSV (id, timestamp, value, region, quality); "
          f"medians of {args.repeat} runs")
    print(f"(a) raw COPY into a bare table    {copy_seconds:7.2f} s  {copy_rate:12,.0f} rows/s")
    print(f"(b) Ingot end to end (API+worker) {seconds:7.2f} s  {rate:12,.0f} rows/s")
    print(f"ratio b/a: {rate / copy_rate:.0%}")
    gz_seconds = statistics.median(gz_runs)
    print(f"(c) Ingot from the same CSV gzip-compressed {gz_seconds:7.2f} s  {args.rows / gz_seconds:12,.0f} rows/s"
          f"  ({gz_megabytes:.0f} MB)")
    print(f"worker peak RSS: {max(peaks) / 2**20:.0f} MB (at rest before the first job: {resting / 2**20:.0f} MB, "
          f"{shared / 2**20:.0f} MB of it shared with the worker's main process; the run added "
          f"{(max(peaks) - resting) / 2**20:.0f} MB); its own memory, shared with no other process, "
          f"{max(privates) / 2**20:.0f} MB at most (sampled every 0.25 s)")
    print(f"re-ingest, file unchanged (skipped): {again:.2f} s, {again / seconds:.2f}x the first load (goal 0.2x)")
    print(f"re-ingest, file unchanged, forced:   {forced:.2f} s, {forced / seconds:.2f}x")
    print(f"re-ingest, 1% of rows changed:       {changed:.2f} s, {changed / seconds:.2f}x (goal 0.5x)")


def change_one_percent(path) -> None:
    """Every hundredth row's value changed, the file rewritten (its size and time change)."""
    lines = path.read_text().splitlines(keepends=True)
    for i in range(1, len(lines), 100):
        fields = lines[i].split(",")
        fields[2] = f"{float(fields[2]) + 1:.4f}"
        lines[i] = ",".join(fields)
    path.write_text("".join(lines))


if __name__ == "__main__":
    main()
