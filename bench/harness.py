"""What every benchmark needs: a scratch INGOT_HOME on the embedded servers, the real API in a
thread, a real worker process, and a way to time a job end to end with the worker's peak RSS."""

from __future__ import annotations

import asyncio
import atexit
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


class Bench:
    def __init__(self, sources_toml: str, port: int = 8765, worker_args: list[str] | None = None, **env: str):
        self.home = Path(tempfile.mkdtemp(prefix="ingot-bench-"))
        self.data = self.home / "data"
        self.data.mkdir()
        # sources.toml and the data beside INGOT_HOME, not in it: file sources may not read there.
        os.environ.update(INGOT_HOME=str(self.home / "ingot"), INGOT_SOURCES_FILE=str(self.home / "sources.toml"),
                          INGOT_LOG_LEVEL="WARNING", INGOT_WORKER_CONCURRENCY="1", INGOT_IGNORE_ENV_FILE="1")
        os.environ.update(env)
        (self.home / "sources.toml").write_text(sources_toml)
        self.worker_args = worker_args or ["--concurrency", "1"]
        self.port = port
        self.worker = None
        self.server = None
        self.keep = False
        # Registered before the embedded servers register their own exit hooks, so it runs after them:
        # the scratch home (its PostgreSQL data included) goes once they have stopped.
        atexit.register(lambda: self.keep or shutil.rmtree(self.home, ignore_errors=True))

    def start(self) -> Bench:
        from pipelines.auth import keys
        from pipelines.core import embedded, migrate
        from pipelines.core.db import session_scope
        from pipelines.core.settings import get_settings

        settings = get_settings()
        self.database_url = embedded.database_url(settings)
        os.environ.update(INGOT_DATABASE_URL=self.database_url, INGOT_REDIS_URL=embedded.redis_url(settings))
        migrate.upgrade()
        print(postgres_settings())
        with session_scope() as session:
            _row, self.key = keys.create_key(session, "bench", ["admin"])

        import uvicorn

        from api.main import SERVER_OPTIONS, create_app

        self.server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=self.port, **SERVER_OPTIONS,
                                                    log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        self.worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", *self.worker_args], cwd=ROOT,
                                       env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from worker.app import app

        while not app.control.ping(timeout=0.5):
            time.sleep(0.2)
        return self

    def quiesce(self, timeout: float = 120) -> None:
        """Vacuum now what autovacuum would get to later (after its one-minute nap, in the middle of
        the next run), checkpoint, wait until no autovacuum is at work, and let the OS write back dirty
        pages, so that one run's aftermath is not timed in the next."""
        import psycopg

        with psycopg.connect(self.database_url.replace("postgresql+psycopg://", "postgresql://"),
                             autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            conn.execute("CHECKPOINT")  # PostgreSQL's own dirty pages written now, not during the next run
            deadline = time.monotonic() + timeout
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                               ).fetchone()[0] and time.monotonic() < deadline:
                time.sleep(0.2)
        os.sync()

    def ingest(self, sources: list[str], **options) -> tuple[dict, float, int]:
        """Start an ingestion through the API and wait: (final job, seconds, worker peak RSS bytes)."""
        return self.track(lambda client: client.start_ingestion(sources, **options)["job_id"])

    def track(self, start) -> tuple[dict, float, int]:
        """Run START(client) -> job id, and wait for that job: (final job, seconds, worker peak RSS).

        The time runs from the request that starts the job to the job's `finished_at` as the API
        reports it, so how often this loop polls neither adds to it nor takes CPU from the job
        (it polls gently). The peak RSS is the kernel's high-water mark of the pool processes, reset
        before the job starts."""
        from datetime import datetime

        import psutil

        from cli.client import Client

        pool = psutil.Process(self.worker.pid).children(recursive=True)
        for proc in pool:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        self.private_peak = 0  # the most memory a pool process held of its own, sampled as the job ran
        with Client(f"http://127.0.0.1:{self.port}", self.key) as client:
            began = time.time()
            job_id = start(client)
            while (job := client.job(job_id))["state"] not in ("succeeded", "failed", "cancelled"):
                self.private_peak = max([self.private_peak, *(_memory(proc.pid).get("Private", 0) for proc in pool)])
                time.sleep(0.25)
        seconds = datetime.fromisoformat(job["finished_at"]).timestamp() - began
        peak = max((_peak_rss(proc.pid) for proc in pool), default=0)
        if job["state"] != "succeeded":
            raise SystemExit(f"{job['kind']} {job['state']}: {job['error']}")
        return job, seconds, peak

    def stop(self, keep: bool = False) -> None:
        if self.worker:
            self.worker.terminate()
            self.worker.wait(30)
        if self.server:
            self.server.should_exit = True
        self.keep = keep
        if not keep:
            shutil.rmtree(self.data, ignore_errors=True)


def servers_with_a_job() -> tuple[str, str]:
    """The embedded servers started and migrated (their settings printed), an admin key whose rate
    limit is out of the way, and one queued job to poll: (the key, the job's id). For benchmarks that
    run `ingot api` as a process of its own rather than Bench's in-process server."""
    from pipelines.auth import keys
    from pipelines.core import embedded, migrate, runtime
    from pipelines.core.db import session_scope
    from pipelines.core.models import Job, JobKind
    from pipelines.core.settings import get_settings

    settings = get_settings()
    os.environ.update(INGOT_DATABASE_URL=embedded.database_url(settings), INGOT_REDIS_URL=embedded.redis_url(settings))
    migrate.upgrade()
    print(postgres_settings())
    with session_scope() as session:
        _row, key = keys.create_key(session, "bench", ["admin"])
        job = Job(kind=JobKind.INGESTION, params={"sources": []}, timeout_seconds=3600)
        session.add(job)
        session.flush()
        job_id = job.id
    runtime.update({"rate_limit_per_minute": 10_000_000})
    return key, job_id


def postgres_settings() -> str:
    """The server a benchmark ran on and the settings its figures depend on, for its first line: the
    embedded server runs with `wal_level = minimal`, compose's with PostgreSQL's defaults."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    names = ["wal_level", "synchronous_commit", "fsync", "shared_buffers", "max_wal_size", "checkpoint_timeout"]
    with get_engine().connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar_one()
        rows = conn.execute(text("SELECT name, setting, COALESCE(unit, '') FROM pg_settings WHERE name = ANY(:n) "
                                 "ORDER BY name"), {"n": names}).all()
    return f"PostgreSQL {version}: " + ", ".join(f"{name} = {setting}{unit}" for name, setting, unit in rows)


def resting_pool_memory(bench: Bench) -> tuple[int, int]:
    """(RSS, the part of it shared with the worker's main process) of its first pool process, in bytes:
    what the imports cost before any job, counted in every pool process's RSS."""
    import psutil

    pool = psutil.Process(bench.worker.pid).children(recursive=True)
    if not pool:
        return 0, 0
    fields = _memory(pool[0].pid)
    return fields["Rss"], fields["Shared_Clean"] + fields["Shared_Dirty"]


def _memory(pid: int) -> dict[str, int]:
    """PID's memory by kind (/proc/PID/smaps_rollup), in bytes; "Private" is its own, shared with no
    other process (USS)."""
    fields = {}
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:  # gone
        return {}
    for line in lines:
        name, value, *_unit = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    fields["Private"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields


def _peak_rss(pid: int) -> int:
    """The peak resident set size of PID since its last reset, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class LeanClient:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request and its answer, nothing more. The
    clients share the machine with what they measure, and httpx spends about 3 ms of CPU a request
    here; this spends a tenth of that, so the figures are the server's."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """METHOD PATH with BODY (JSON, if any): (status, answer body)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        kind = "Content-Type: application/json\r\n" if body else ""
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}{kind}Content-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        status_line = await self.reader.readline()
        length, closing = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                closing = True
        body = await self.reader.readexactly(length)
        if closing:
            self.close()
        return int(status_line.split()[1]), body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def rank(ordered: list[float], fraction: float) -> float:
    """The value at FRACTION (0.5, 0.99) of the sorted list ORDERED, by nearest rank."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generate_csv(path: Path, rows: int, start: int = 0, append: bool = False) -> None:
    """ROWS rows of (id, timestamp, value, region, quality), timestamps growing one minute a row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    base = np.datetime64("2020-01-01T00:00:00")
    schema = pa.schema([("id", pa.string()), ("timestamp", pa.string()), ("value", pa.float64()),
                        ("region", pa.string()), ("quality", pa.int64())])
    with path.open("ab" if append else "wb") as sink:
        options = pacsv.WriteOptions(include_header=not append)
        with pacsv.CSVWriter(sink, schema, write_options=options) as writer:
            for offset in range(start, start + rows, 500_000):
                n = min(500_000, start + rows - offset)
                idx = np.arange(offset, offset + n)
                writer.write_table(pa.table({
                    "id": pa.array([f"id-{i:09d}" for i in idx]),
                    "timestamp": pa.array((base + idx.astype("timedelta64[m]")).astype(str)),
                    "value": pa.array(np.round(np.sin(idx / 1000) * 100 + 50, 4)),
                    "region": pa.array(np.array(["north", "south", "east", "west"])[idx % 4]),
                    "quality": pa.array(idx % 3),
                }, schema=schema))


def csv_source(name: str, path: str, cursor: bool = False) -> str:
    return (f'[sources.{name}]\ntype = "file"\nformat = "csv"\npath = "{path}"\nprimary_key = ["id"]\n'
            + ('cursor = "timestamp"\n' if cursor else "")
            + f'[sources.{name}.validation]\nrequired_columns = ["id", "timestamp", "value"]\n'
            'data_types = { timestamp = "datetime", value = "float", quality = "int" }\n')
