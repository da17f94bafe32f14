"""Backlog benchmark: N trivial jobs posted through the API by 16 clients, beside bare Celery.

    .venv/bin/python bench/backlog.py [--jobs 3000] [--clients 16] [--concurrency 2] [--profile DIR [--gil]]

In one run, on the embedded servers (or INGOT_DATABASE_URL / INGOT_REDIS_URL when set):

1. Bare Celery: N no-op tasks (`bench/bare_celery.py`) published to the same Redis and consumed by a
   worker with CONCURRENCY prefork processes, late acks and prefetch 1, as Ingot's are. Its figure is
   N over the time from the first publish to the last task counted.
2. The floor: the same, but each task keeps a row as a job system whose row decides must
   (`bare.row`): the row inserted before its task is published (a hundred to a commit), claimed by
   one guarded UPDATE and ended by another, each its own commit. No API, events or outputs: the
   least any such design pays on top of Celery.
3. Ingot: one scenario over one demo curve (24 contract months); 16 async clients POST its run N times
   through the API (a key with its rate limit raised). Workers: CONCURRENCY prefork processes on the
   scenarios queue, and a housekeeping worker (webhooks and default queues, beat, so the reaper and
   the relay run as in production). The figure is N over the time from the first POST until every
   job has ended.

Printed beside them: starts/s through the API, the start's p50/p99 while the backlog drains, Redis's
memory at its peak, the reaper's tick (timed here, in this process, over the live backlog every few
seconds, with the statements and broker commands it made), and the checks: every job succeeded once
(one output row a run, and no end event: no webhook endpoint subscribes), every bare task counted
once, every floor row ended once. `--profile DIR` runs py-spy on the API, the scenarios worker's main
process and one of its pool processes, and the housekeeping worker for 20 s of the drain and writes
their collapsed stacks there (`bench/stacks.py` sums them by function; `--gil` keeps only the samples
of a thread holding the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import ROOT, Bench, LeanClient, free_port, postgres_settings
from scenarios import SOURCE as CURVES  # a curves source over data/*.csv

SHOCKS = [{"type": "parallel", "value": 0.5}, {"type": "percent", "value": 2}]
HERE = Path(__file__).resolve().parent
# Whether any run has yet to end, answered from the partial index of active jobs (its states written out,
# so the planner sees it applies). A count of every run not ended, ten times a second, read the whole
# backlog each time (5 ms a call at 20,000 runs) and was charged to PostgreSQL's CPU a job.
_ANY_ACTIVE = ("SELECT EXISTS (SELECT FROM jobs WHERE state IN ('queued', 'running', 'cancelling') "
               "AND kind = 'scenario_run')")


def spawn(args: list[str], env: dict, cwd: Path = ROOT, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class CpuMeter:
    """CPU seconds (user + system) spent by each part of the system over a stretch: the processes of
    each named tree, and the PostgreSQL and Redis servers."""

    def __init__(self, trees: dict[str, int]):
        self.trees = trees
        self.start = self.read()

    def read(self) -> dict[str, float]:
        import psutil

        spent: dict[str, float] = {}

        def add(part: str, proc) -> None:
            try:
                times = proc.cpu_times()
                spent[part] = spent.get(part, 0.0) + times.user + times.system + times.children_user \
                    + times.children_system
            except psutil.Error:
                pass

        for part, pid in self.trees.items():
            try:
                root = psutil.Process(pid)
            except psutil.Error:
                continue
            for proc in [root, *root.children(recursive=True)]:
                add(part, proc)
        for proc in psutil.process_iter(["name"]):
            name = proc.info["name"] or ""
            if name.startswith("postgres"):
                add("PostgreSQL", proc)
            elif name.startswith("redis-server"):
                add("Redis", proc)
        add("this script (clients)", psutil.Process())
        return spent

    def per(self, n: int) -> dict[str, float]:
        end = self.read()
        return {part: (end.get(part, 0.0) - self.start.get(part, 0.0)) / n for part in end}


def wait_until(check, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)


def bare_celery(n: int, concurrency: int, broker: str, counter_url: str, env: dict, database: str | None = None
                ) -> dict:
    """Publish N tasks, consume them with CONCURRENCY processes: the tasks a second. Without DATABASE,
    bare Celery's no-op tasks; with it (libpq), the floor: each task's row inserted before it is
    published (a hundred rows to a commit, kinder than one start to a commit), claimed and ended."""
    import psycopg
    import redis

    os.environ.update(BARE_BROKER_URL=broker, BARE_COUNTER_URL=counter_url)
    sys.path.insert(0, str(HERE))
    import bare_celery

    counter = redis.Redis.from_url(counter_url)
    counter.delete(bare_celery.COUNTER)
    env = dict(env, BARE_BROKER_URL=broker, BARE_COUNTER_URL=counter_url, BARE_DATABASE_URL=database or "")
    rows = psycopg.connect(database, autocommit=True) if database else None
    if rows:
        rows.execute(bare_celery.TABLE_DDL)
        rows.execute("TRUNCATE bench_floor")
    task = bare_celery.row if rows else bare_celery.noop

    def done() -> int:  # in Redis: a count over the table every 50 ms would load the database being measured
        return int(counter.get(bare_celery.COUNTER) or 0)

    worker = spawn([sys.executable, "-m", "celery", "-A", "bare_celery", "worker", "-Q", bare_celery.QUEUE,
                    "--concurrency", str(concurrency), "--without-mingle", "--without-gossip", "--loglevel",
                    "WARNING"], env, cwd=HERE)
    try:
        wait_until(lambda: bare_celery.app.control.ping(timeout=0.5), 60, "the bare worker")
        meter = CpuMeter({"workers": worker.pid})
        began = time.perf_counter()
        with bare_celery.app.producer_or_acquire() as producer:
            for first in range(0, n, 100):
                batch = range(first, min(first + 100, n))
                if rows:
                    rows.execute("INSERT INTO bench_floor (id, state) "
                                 "SELECT g, 'queued' FROM generate_series(%s::bigint, %s) g", (batch[0], batch[-1]))
                for i in batch:
                    task.apply_async((i,), producer=producer)
        published = time.perf_counter() - began
        wait_until(lambda: done() >= n, 3600, "the bare tasks", 0.05)
        took = time.perf_counter() - began
        cpu = meter.per(n)
        time.sleep(1)  # a task counted twice would show now
        if rows:
            ended, once = rows.execute("SELECT count(*) FILTER (WHERE state = 'succeeded'), "
                                       "count(*) FILTER (WHERE attempts = 1) FROM bench_floor").fetchone()
            rows.execute("DROP TABLE bench_floor")
            rows.close()
            if (ended, once) != (n, n):
                raise SystemExit(f"the floor ended {ended} of {n} rows, {once} in one attempt")
        elif (counted := done()) != n:
            raise SystemExit(f"bare Celery counted {counted} tasks for {n} sent")
    finally:
        stop(worker)
    return {"seconds": took, "published": published, "rate": n / took, "cpu": cpu}


async def post_runs(port: int, key: str, scenario_id: str, n: int, clients: int
                    ) -> tuple[list[str], list[float], float]:
    """N run starts from CLIENTS concurrent clients: (job ids, each start's seconds, the whole time)."""
    import json

    ids: list[str] = []
    latencies: list[float] = []
    remaining = iter(range(n))
    path = f"/api/v1/scenarios/{scenario_id}/run"

    async def client_loop() -> None:
        client = LeanClient("127.0.0.1", port, {"X-API-Key": key})
        try:
            for _ in remaining:
                for attempt in range(20):
                    began = time.perf_counter()
                    status, body = await client.request("POST", path)
                    if status == 202:
                        latencies.append(time.perf_counter() - began)
                        ids.append(json.loads(body)["data"]["run_id"])
                        break
                    await asyncio.sleep(0.05 * (attempt + 1))
                else:
                    raise SystemExit(f"a start failed 20 times: {status} {body[:300]!r}")
        finally:
            client.close()

    began = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return ids, latencies, time.perf_counter() - began


class Sampler(threading.Thread):
    """While the backlog drains: Redis memory at its peak, and the reaper's tick over the live backlog."""

    def __init__(self, redis_url: str, every: float = 5.0):
        super().__init__(daemon=True)
        import redis

        self.redis = redis.Redis.from_url(redis_url)
        self.every = every
        self.halt = threading.Event()
        self.peak_memory = 0
        self.ticks: list[tuple[float, int, int, int]] = []  # (seconds, queued then, statements, broker calls)

    def run(self) -> None:
        from pipelines.jobs import reaper

        while not self.halt.wait(self.every):
            self.peak_memory = max(self.peak_memory, int(self.redis.info("memory")["used_memory"]))
            self.ticks.append(reaper_tick(reaper))

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def reaper_tick(reaper) -> tuple[float, int, int, int]:
    from sqlalchemy import text

    from pipelines.core.db import get_engine
    from pipelines.core.roundtrips import RoundTrips
    from worker.dispatch import queue_depth, send_job

    with get_engine().connect() as conn:
        queued = conn.execute(text("SELECT count(*) FROM jobs WHERE state = 'queued'")).scalar_one()
    with RoundTrips() as trips:
        began = time.perf_counter()
        reaper.reap(send_job, queue_depth)
        took = time.perf_counter() - began
    return took, queued, trips.statements, trips.broker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--profile", type=Path, help="write py-spy stacks of the drain here")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: sample only threads holding the GIL (CPU in Python, not waits)")
    parser.add_argument("--skip-bare", action="store_true", help="Ingot alone (while profiling)")
    args = parser.parse_args()

    # One key posts every run: its quota of runs queued at once is raised past N, as a team with such a
    # backlog would have it.
    bench = Bench(CURVES, INGOT_LOG_LEVEL="WARNING", INGOT_MAX_SCENARIO_RUNS_PER_KEY=str(10 * args.jobs + 10_000))
    procs: list[subprocess.Popen] = []
    try:
        import psycopg

        from pipelines.auth import keys
        from pipelines.core import embedded, migrate, runtime
        from pipelines.core.db import session_scope
        from pipelines.core.settings import get_settings
        from pipelines.curves import synthetic

        settings = get_settings()
        dsn = bench.database_url = embedded.database_url(settings)
        redis_url = embedded.redis_url(settings)
        os.environ.update(INGOT_DATABASE_URL=dsn, INGOT_REDIS_URL=redis_url)
        migrate.upgrade()
        with session_scope() as session:
            _row, key = keys.create_key(session, "bench", ["admin"])
        runtime.update({"rate_limit_per_minute": 10_000_000})
        libpq = dsn.replace("postgresql+psycopg://", "postgresql://")
        print(postgres_settings())
        print(f"{args.jobs:,} jobs, {args.clients} clients, worker concurrency {args.concurrency}, "
              f"{os.cpu_count()} cores shared")

        env = dict(os.environ)
        broker = embedded.celery_broker_url(redis_url)
        bare = None if args.skip_bare else bare_celery(args.jobs, args.concurrency, broker, redis_url, env)
        floor = None if args.skip_bare else bare_celery(args.jobs, args.concurrency, broker, redis_url, env, libpq)

        import csv

        with (bench.data / "curves.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(synthetic.COLUMNS)
            writer.writerows(synthetic.points(synthetic.DEMO[:1], [dt.date(2026, 11, 20)], 24))
        port = free_port()
        api_env = dict(env, INGOT_API_PORT=str(port), INGOT_LOG_LEVEL="WARNING")
        procs.append(spawn([sys.executable, "-m", "cli.main", "api", "--no-migrate"], api_env))
        procs.append(spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "scenarios,ingest",
                            "--concurrency", str(args.concurrency)], env, log=bench.home / "worker.log"))
        procs.append(spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "webhooks,default",
                            "--concurrency", "1", "--beat"], env, log=bench.home / "housekeeping.log"))
        url = f"http://127.0.0.1:{port}"
        from cli.client import Client

        with Client(url, key) as client:
            wait_until(lambda: _up(client), 60, "the API")
            curves = client.wait(client.start_ingestion(["curves"])["job_id"], timeout=120)
            if curves["state"] != "succeeded":
                raise SystemExit(f"curves: {curves}")
            scenario = client.create_scenario({"name": "backlog", "base": {"curve_keys": ["NG_HENRY_HUB"]},
                                               "shocks": SHOCKS})
        bench.quiesce()

        profilers = start_profilers(args.profile, procs, args.gil) if args.profile else []
        sampler = Sampler(redis_url)
        sampler.start()
        meter = CpuMeter({"API": procs[0].pid, "workers": procs[1].pid, "housekeeping worker": procs[2].pid})
        began = time.perf_counter()
        ids, latencies, posting = asyncio.run(post_runs(port, key, scenario["scenario_id"], args.jobs, args.clients))
        with psycopg.connect(libpq, autocommit=True) as conn:
            wait_until(lambda: not conn.execute(_ANY_ACTIVE).fetchone()[0], 7200, "the jobs to end", 0.1)
            took = time.perf_counter() - began
            cpu = meter.per(args.jobs)
            sampler.stop()
            for proc in profilers:
                proc.wait(60)
            checks = verify(conn, ids, args.jobs)

        rate = args.jobs / took
        nan = float("nan")

        def row(label: str, ingot: float, figure) -> str:
            return f"{label:34} {ingot:12.2f} " + " ".join(
                f"{figure(other) if other else nan:12.2f}" for other in (bare, floor))

        print()
        print(f"{'':34} {'Ingot':>12} {'bare Celery':>12} {'the floor':>12}")
        print(row("all ended (s)", took, lambda other: other["seconds"]))
        print(row("jobs (tasks) a second", rate, lambda other: other["rate"])
              + (f"   Ingot {rate / bare['rate']:.2f}x bare Celery, the floor {floor['rate'] / bare['rate']:.2f}x"
                 if bare and floor else ""))
        print(row("accepted (published) a second", args.jobs / posting, lambda other: args.jobs / other["published"]))
        quantiles = statistics.quantiles(latencies, n=100)
        print(f"start through the API: p50 {quantiles[49] * 1000:.1f} ms, p99 {quantiles[98] * 1000:.1f} ms "
              f"(while the backlog drains)")
        print(f"Redis memory at its peak: {sampler.peak_memory / 2**20:.1f} MiB")
        for seconds, queued, statements, broker_calls in sampler.ticks:
            print(f"reaper tick over {queued:>7,} queued: {seconds * 1000:7.1f} ms, {statements} statements, "
                  f"{broker_calls} broker commands")
        print("CPU a job (ms), by part:")
        parts = set(cpu) | set(bare["cpu"] if bare else {}) | set(floor["cpu"] if floor else {})
        for part in sorted(parts):
            print(row(f"  {part}", cpu.get(part, 0) * 1000, lambda other, part=part: other["cpu"].get(part, 0) * 1000))
        print(row("  all", sum(cpu.values()) * 1000, lambda other: sum(other["cpu"].values()) * 1000))
        print("checks: " + "; ".join(checks))
    finally:
        for proc in procs:
            stop(proc)
        bench.stop()


def _up(client) -> bool:
    try:
        client.health()
        return True
    except Exception:
        return False


def start_profilers(directory: Path, procs: list[subprocess.Popen], gil: bool = False) -> list[subprocess.Popen]:
    """py-spy over the API, the worker's main process, one of its pool processes and the housekeeping
    worker (beat, the reaper, the outbox listener) for 20 s of the drain (collapsed stacks); with `gil`,
    only the samples of a thread holding the GIL."""
    import psutil

    directory.mkdir(parents=True, exist_ok=True)
    pool = psutil.Process(procs[1].pid).children()
    targets = {"api": procs[0].pid, "pool": pool[0].pid, "worker": procs[1].pid, "housekeeping": procs[2].pid}
    spy = str(Path(sys.executable).parent / "py-spy")
    return [subprocess.Popen([spy, "record", "-p", str(pid), "-d", "20", "-r", "100", "-f", "raw", "-o",
                              str(directory / f"{name}.txt"), "--nonblocking", *(["--gil"] if gil else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in targets.items()]


def verify(conn, ids: list[str], n: int) -> list[str]:
    """Every job ended succeeded, once: one output row per run, and no end event, since no webhook endpoint
    subscribes (migration 0027: a job's end writes its event only for a subscriber)."""
    assert len(ids) == n == len(set(ids)), "the API returned the same id twice"
    succeeded, one_attempt = conn.execute(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE attempts = 1) "
        "FROM jobs WHERE id = ANY(%s)", (ids,)).fetchone()
    events = conn.execute("SELECT count(*), count(DISTINCT job_id) FROM webhook_events WHERE job_id = ANY(%s)",
                          (ids,)).fetchone()
    outputs = conn.execute("SELECT count(*), count(DISTINCT run_id) FROM scenario_outputs WHERE run_id = ANY(%s)",
                           (ids,)).fetchone()
    if succeeded != n or events != (0, 0) or outputs != (n, n):
        raise SystemExit(f"not every job ended once: {succeeded} succeeded of {n}, events {events}, "
                         f"outputs {outputs}")
    return [f"{succeeded:,} of {n:,} succeeded", f"{one_attempt:,} in one attempt",
            f"{events[0]:,} end events (no endpoint subscribes)", f"{outputs[0]:,} output rows for {outputs[1]:,} runs"]


if __name__ == "__main__":
    main()
