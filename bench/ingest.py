"""Ingestion benchmark: raw psycopg COPY of a CSV versus Ingot's end-to-end ingestion of it.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--batch-size 100000]

Both run in the same process against the same PostgreSQL (embedded unless INGOT_DATABASE_URL is
set): (a) `COPY ... FROM STDIN` into a bare table; (b) POST /ingestion/start through the real API to
a real worker, timed until the job has succeeded. Prints rows/s for both, the ratio b/a, and the
peak RSS of the worker process that ran the job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    start = np.datetime64("2020-01-01T00:00:00")
    with pacsv.CSVWriter(path, pa.schema([("id", pa.string()), ("timestamp", pa.string()),
                                          ("value", pa.float64()), ("region", pa.string()),
                                          ("quality", pa.int64())])) as writer:
        for offset in range(0, rows, 500_000):
            n = min(500_000, rows - offset)
            idx = np.arange(offset, offset + n)
            stamps = (start + idx.astype("timedelta64[m]")).astype(str)
            writer.write_table(pa.table({
                "id": pa.array([f"id-{i:09d}" for i in idx]),
                "timestamp": pa.array(stamps),
                "value": pa.array(np.round(np.sin(idx / 1000) * 100 + 50, 4)),
                "region": pa.array(np.array(["north", "south", "east", "west"])[idx % 4]),
                "quality": pa.array(idx % 3),
            }))


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
    parser.add_argument("--keep", action="store_true", help="keep the generated data folder")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ingot-bench-"))
    data = home / "data"
    data.mkdir()
    csv_path = data / "bench.csv"
    os.environ.update(INGOT_HOME=str(home), INGOT_SOURCES_FILE=str(home / "sources.toml"),
                      INGOT_LOG_LEVEL="WARNING", INGOT_WORKER_CONCURRENCY="1")
    (home / "sources.toml").write_text(
        '[sources.bench]\ntype = "file"\nformat = "csv"\npath = "data/bench.csv"\nprimary_key = ["id"]\n'
        '[sources.bench.validation]\nrequired_columns = ["id", "timestamp", "value"]\n'
        'data_types = { timestamp = "datetime", value = "float", quality = "int" }\n'
    )
    print(f"generating {args.rows:,} rows ...", flush=True)
    generate(csv_path, args.rows)
    size_mb = csv_path.stat().st_size / 1e6

    from pipelines import embedded, keys, migrate
    from pipelines.db import session_scope
    from pipelines.settings import get_settings

    settings = get_settings()
    database_url = embedded.database_url(settings)
    redis_url = embedded.redis_url(settings)
    os.environ.update(INGOT_DATABASE_URL=database_url, INGOT_REDIS_URL=redis_url)
    migrate.upgrade()

    copy_seconds = raw_copy(database_url, csv_path)

    import psutil
    import uvicorn

    from api.client import Client
    from api.main import create_app

    with session_scope() as session:
        _row, key = keys.create_key(session, "bench", ["admin"])
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=8765, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    worker = subprocess.Popen([sys.executable, "-m", "api.cli", "worker", "--concurrency", "1"], cwd=ROOT,
                              env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    try:
        from worker.app import app

        while not app.control.ping(timeout=0.5):
            time.sleep(0.2)
        with Client("http://127.0.0.1:8765", key) as client:
            began = time.perf_counter()
            job_id = client.start_ingestion(["bench"], batch_size=args.batch_size)["job_id"]
            while True:
                for proc in psutil.Process(worker.pid).children(recursive=True):
                    try:
                        peak = max(peak, proc.memory_info().rss)
                    except psutil.NoSuchProcess:
                        pass
                job = client.job(job_id)
                if job["state"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            ingot_seconds = time.perf_counter() - began
    finally:
        worker.terminate()
        worker.wait(30)
        server.should_exit = True
    if job["state"] != "succeeded":
        raise SystemExit(f"ingestion {job['state']}: {job['error']}")
    assert job["records_processed"] == args.rows, job

    copy_rate, ingot_rate = args.rows / copy_seconds, args.rows / ingot_seconds
    print(f"input: {args.rows:,} rows, {size_mb:.0f} MB CSV (id, timestamp, value, region, quality)")
    print(f"(a) raw COPY into a bare table  {copy_seconds:7.2f} s  {copy_rate:12,.0f} rows/s")
    print(f"(b) Ingot end to end (API+worker) {ingot_seconds:5.2f} s  {ingot_rate:12,.0f} rows/s")
    print(f"ratio b/a: {ingot_rate / copy_rate:.0%}")
    print(f"worker peak RSS: {peak / 2**20:.0f} MB")
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
