"""Soak: a steady mixed load for a while, then what it did and whether anything grew.

    .venv/bin/python bench/soak.py [--minutes 10]        (make soak)

One worker process (2 pool processes, with beat) and one for webhooks, the API, embedded servers, a
local webhook receiver. Every few seconds: an ingestion (a source re-read in full, through the merge
path), an export, a scenario run; every job's end is a webhook event. It reports throughput per
kind, p50/p99 from the POST to the job's end, and at the start and the end: worker RSS, open file
descriptors, database connections, Redis memory, table sizes; and it says what grew beyond noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from datetime import datetime

import psutil
from harness import ROOT, Bench, generate_csv

sys.path.insert(0, str(ROOT))

SOURCES = 4
ROWS = 20_000
EVERY = {"ingestion": 3.0, "export": 10.0, "scenario_run": 5.0}  # seconds between submissions
WARM_UP = 60.0  # seconds of load before the first reading
TABLES = ("observations", "jobs", "events", "webhook_events", "webhook_deliveries", "webhook_attempts",
          "quarantine", "scenario_outputs", "scenario_metrics")


def declarations() -> str:
    from testkit.curves import CURVES_SOURCE

    parts = [CURVES_SOURCE.format(glob="curves/*.csv")]
    for i in range(SOURCES):
        parts.append(f'[sources.s{i}]\ntype = "file"\nformat = "csv"\npath = "data/s{i}.csv"\nprimary_key = ["id"]\n'
                     f'[sources.s{i}.validation]\ndata_types = {{ timestamp = "datetime", value = "float" }}\n')
    return "".join(parts)


def snapshot(bench: Bench, workers: list[psutil.Process]) -> dict:
    import psycopg
    import redis

    from pipelines.core import embedded
    from pipelines.core.settings import get_settings

    procs = [p for w in workers for p in [w, *w.children(recursive=True)]]
    figures = {"worker RSS (MB)": sum(p.memory_info().rss for p in procs) / 2**20,
               "worker open fds": sum(p.num_fds() for p in procs)}
    with psycopg.connect(bench.database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        figures["database connections"] = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()[0]
        for table in TABLES:  # a partitioned table's size is its partitions'
            size = conn.execute("SELECT pg_total_relation_size(%s::regclass) + COALESCE((SELECT "
                                "sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                                "WHERE inhparent = %s::regclass), 0)", (table, table)).fetchone()[0]
            figures[f"{table} (MB)"] = float(size) / 2**20
    info = redis.Redis.from_url(embedded.redis_url(get_settings())).info("memory")
    figures["Redis memory (MB)"] = info["used_memory"] / 2**20
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()

    from pipelines.curves import synthetic
    from testkit.curves import write_curves
    from testkit.receiver import Receiver

    bench = Bench(declarations(), worker_args=["--concurrency", "2", "--beat", "--queues",
                                               "ingest,export,scenarios,default"],
                  INGOT_WEBHOOK_ALLOW_PRIVATE="true")
    (bench.data / "curves").mkdir()
    write_curves(bench.data / "curves" / "c.csv",
                 synthetic.points(synthetic.DEMO, synthetic.business_days(dt.date(2026, 11, 20), 5), 36))
    for i in range(SOURCES):
        generate_csv(bench.data / f"s{i}.csv", ROWS, start=i * ROWS)
    receiver = Receiver()
    webhooks = None
    try:
        bench.start()
        import subprocess

        from cli.client import Client

        webhooks = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--queues", "webhooks", "--pool",
                                     "threads", "--concurrency", "4"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        client = Client(f"http://127.0.0.1:{bench.port}", bench.key)
        first = client.wait(client.start_ingestion()["job_id"], timeout=600)
        assert first["state"] == "succeeded", first
        receiver.secret = client.create_webhook(receiver.url, ["ingestion.completed", "export.completed",
                                                               "scenario.run.completed"])["secret"]
        scenario = client.create_scenario({"name": "soak", "base": {"curve_keys": ["NG_HENRY_HUB",
                                                                                   "PWR_PJM_WEST_PEAK"]},
                                           "shocks": [{"type": "parallel", "value": 1.0}]})["scenario_id"]
        client.update_config({"max_exports_per_key": 50, "export_rate_limit_per_minute": 1000})
        workers = [psutil.Process(bench.worker.pid), psutil.Process(webhooks.pid)]
        submitted: dict[str, list[tuple[str, float]]] = {kind: [] for kind in EVERY}
        next_at = dict.fromkeys(EVERY, time.monotonic())
        turn = 0
        # The first reading comes after a minute of the same load: pools and caches that fill once
        # (database connections, pool processes' imports) are not growth.
        warm_until = time.monotonic() + WARM_UP
        start: dict | None = None
        end = warm_until + args.minutes * 60
        while time.monotonic() < end:
            if start is None and time.monotonic() >= warm_until:
                start = snapshot(bench, workers)
                submitted = {kind: [] for kind in EVERY}
            now = time.monotonic()
            for kind, every in EVERY.items():
                if now < next_at[kind]:
                    continue
                next_at[kind] = now + every
                try:
                    if kind == "ingestion":
                        turn += 1
                        job_id = client.start_ingestion([f"s{turn % SOURCES}"], mode="full")["job_id"]
                    elif kind == "export":
                        job_id = client.start_export("parquet", filters={"source": "s0"})["export_id"]
                    else:
                        job_id = client.run_scenario(scenario)["run_id"]
                except Exception as exc:  # a source still busy (409): its turn comes again
                    print(f"  {kind} not submitted: {exc}", flush=True)
                    continue
                submitted[kind].append((job_id, time.time()))
            time.sleep(0.2)
        for jobs in submitted.values():
            for job_id, _ in jobs:
                client.wait(job_id, timeout=600)
        time.sleep(5)
        finish = snapshot(bench, workers)
        assert start is not None
        print(f"soak: {args.minutes:g} minutes; ingestion of {ROWS:,} rows every {EVERY['ingestion']:g} s "
              f"(as a source allows), an export every {EVERY['export']:g} s, a scenario run every "
              f"{EVERY['scenario_run']:g} s; webhooks to a local receiver")
        print(f"{'kind':14} {'jobs':>5} {'ok':>5} {'per min':>8} {'p50':>8} {'p99':>8}")
        for kind, jobs in submitted.items():
            ends, ok = [], 0
            for job_id, posted in jobs:
                job = client.job(job_id)
                ok += job["state"] == "succeeded"
                ends.append(datetime.fromisoformat(job["finished_at"]).timestamp() - posted)
            q = statistics.quantiles(ends, n=100) if len(ends) >= 2 else [ends[0]] * 99 if ends else [0.0] * 99
            print(f"{kind:14} {len(jobs):5} {ok:5} {ok / args.minutes:8.1f} {q[49]:7.2f}s {q[98]:7.2f}s")
        measured = {job_id for jobs in submitted.values() for job_id, _ in jobs}
        events = {r["headers"]["webhook-id"] for r in receiver.received
                  if r["verified"] and r["payload"]["data"]["id"] in measured}
        print(f"webhook events received: {len(events)} of {len(measured)} jobs")
        print(f"\n{'':26} {'start':>10} {'end':>10}  growth")
        for name, before in start.items():
            after = finish[name]
            grew = after - before
            noisy = 5 if "fds" in name or "connections" in name else max(0.25 * before, 2.0)
            flag = "" if grew <= noisy or name.startswith(("observations", "jobs", "events", "webhook",
                                                            "scenario", "quarantine")) else "  <- grew"
            print(f"{name:26} {before:10.1f} {after:10.1f}  {grew:+.1f}{flag}")
        print("(tables grow with the work done and are bounded by retention; the processes and servers "
              "should not grow)")
    finally:
        receiver.close()
        if webhooks is not None:
            webhooks.terminate()
            webhooks.wait(30)
        bench.stop()


if __name__ == "__main__":
    main()
