"""What tests share beyond fixtures: polling with a deadline, ports, keys, seeding rows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testkit.waiting import wait_for  # noqa: F401  (tests take it from here)

ROOT = Path(__file__).resolve().parents[1]


def with_database(url: str, name: str) -> str:
    """URL naming database NAME on the same server (a socket directory in the query stays)."""
    prefix, _, rest = url.partition("//")
    authority, _, path_query = rest.partition("/")
    _db, _, query = path_query.partition("?")
    return f"{prefix}//{authority}/{name}" + (f"?{query}" if query else "")


@contextmanager
def database_of_its_own(suffix: str) -> Iterator[str]:
    """A new, empty database beside the tests' own (named theirs and SUFFIX), dropped afterwards with
    whatever is still connected: its URL, in INGOT_DATABASE_URL's form."""
    import psycopg

    base = os.environ["INGOT_DATABASE_URL"]
    name = f"{base.partition('//')[2].partition('/')[2].partition('?')[0]}_{suffix}"
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # noqa: S608 (a name made here, not input)
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(base, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def migrated_database_of_its_own(suffix: str) -> Iterator[str]:
    """`database_of_its_own`, migrated to the head by a process of its own: its libpq URL."""
    with database_of_its_own(suffix) as database:
        subprocess.run([sys.executable, "-c", "from pipelines.core.migrate import upgrade; upgrade()"], cwd=ROOT,
                       env=dict(os.environ, INGOT_DATABASE_URL=database), check=True, timeout=120)
        yield database.replace("postgresql+psycopg://", "postgresql://", 1)


def counted(reader, counting, query: str) -> Any:
    """QUERY's row on READER, over PostgreSQL's statistics, once COUNTING (another connection) has
    flushed its counts: for tests that hold a statement to what it reads rather than to a time."""
    counting.execute("SELECT pg_stat_force_next_flush()")  # its counts, at its next statement's end
    counting.execute("SELECT 1")
    reader.execute("SELECT pg_stat_clear_snapshot()")
    return reader.execute(query).fetchone()


def watch_until_closed(http, job_id: str, headers: dict) -> tuple[list[str], float]:
    """Watch JOB_ID's event stream with HEADERS until the server closes it: the states it told, and how
    long it stayed open (seconds)."""
    from httpx_sse import connect_sse

    began = time.monotonic()
    with connect_sse(http, "GET", f"/api/v1/jobs/{job_id}/events", headers=headers) as source:
        states = [event.json()["state"] for event in source.iter_sse() if event.event == "job"]
    return states, time.monotonic() - began


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_key(scopes: list[str]) -> str:
    from pipelines.auth import keys
    from pipelines.core.db import session_scope

    with session_scope() as s:
        _row, key = keys.create_key(s, "test", scopes)
    return key


def seed(source: str, job_id: str, batch) -> None:
    """Write BATCH (a ValidBatch) into SOURCE's partition through the merge path, as a run would."""
    from pipelines.core.db import driver, get_engine
    from pipelines.ingestion import partitions
    from pipelines.ingestion.load import Loader

    with get_engine().begin() as connection:
        conn = driver(connection)
        partitions.ensure(conn, source)
        loader = Loader(source, job_id, direct=False)
        loader.load(conn, loader.prepare(batch))



def end_jobs(count: int, prefix: str) -> None:
    """End COUNT jobs at once, as workers would: each end writes its event in the same transaction."""
    from sqlalchemy import text

    from pipelines.core.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, kind, state, progress, records_processed, records_failed, params, result, "
            "sources, attempts, timeout_seconds, checkpoint) "
            "SELECT :p || g, 'ingestion', 'running', 0, 0, 0, '{}', '{}', '{}', 1, 60, '{}' "
            "FROM generate_series(1, :n) g"), {"p": prefix, "n": count})
        conn.execute(text("UPDATE jobs SET state = 'succeeded', finished_at = now() WHERE id LIKE :p || '%'"),
                     {"p": prefix})


@contextmanager
def api_processes(count: int, **env: str) -> Iterator[list[str]]:
    """COUNT API processes (`ingot api`) on the tests' database and Redis, as a deployment scales them
    out, with ENV added to their environment; yields their base URLs once each answers."""
    import httpx

    def answers(url: str) -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    urls, procs = [], []
    try:
        for _ in range(count):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "cli.main", "api", "--no-migrate"], cwd=ROOT,
                                          env={**os.environ, "INGOT_LOG_LEVEL": "WARNING", **env,
                                               "INGOT_API_PORT": str(port)},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_for(lambda url=url: answers(url), timeout=60, message="an API process")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)

class WorkerProcess:
    """A real `ingot worker` (with beat, so the reaper runs) in its own process group."""

    def __init__(self, concurrency: int = 1, beat: bool = True, env: dict | None = None):
        argv = [sys.executable, "-m", "cli.main", "worker", "--concurrency", str(concurrency)]
        if beat:
            argv.append("--beat")
        self.log = open(Path(os.environ["INGOT_HOME"]) / f"worker-{time.time_ns()}.log", "w")
        self.process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.name = None
        self.broker_url = (env or {}).get("INGOT_BROKER_URL")  # another broker than the session's Redis

    def _control_app(self, fresh: bool = False):
        from worker.app import app, create_app

        if not fresh and not self.broker_url:
            return app
        app = create_app()
        if self.broker_url:
            app.conf.broker_url = self.broker_url
        return app

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        app = self._control_app()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                replies = app.control.ping(timeout=0.25) or []
            except Exception:  # the broker restarted under this app's pooled connections: use a new app
                app = self._control_app(fresh=True)
                continue
            for reply in replies:
                for name in reply:
                    if name.startswith(f"ingot-{self.process.pid}@"):
                        self.name = name
                        return self
        raise AssertionError(f"worker did not come up:\n{self.output()}")

    def pool_pids(self) -> list[int]:
        import psutil

        pids = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:  # a pool process just killed is a zombie until its parent reaps it: not a candidate
                if child.status() != psutil.STATUS_ZOMBIE and "beat" not in " ".join(child.cmdline()).lower():
                    pids.append(child.pid)
            except psutil.Error:
                continue
        return pids

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def discard(self) -> None:
        """Gone at once, pool and beat included: a test's worker is not owed a warm shutdown (what it
        left behind, the next test's clean state clears)."""
        self.kill()
        self.log.close()

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def broker():
    """The broker's Redis, as the tests see it (to empty queues, or lose every message at once)."""
    import redis

    return redis.Redis.from_url(os.environ["INGOT_REDIS_URL"])


@contextmanager
def statements_run(connection) -> Iterator[list[tuple[str, Any]]]:
    """The statements run on CONNECTION (SQLAlchemy's) inside the block, with their parameters, as the
    driver got them: for tests that explain what the code builds rather than SQL copied into them."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def note(conn, cursor, statement, parameters, context, many) -> None:
        seen.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(connection, "before_cursor_execute", note)


def explain(connection, statement: str, parameters: Any) -> str:
    """The plan PostgreSQL gives STATEMENT on CONNECTION, under that connection's settings."""
    cursor = connection.connection.driver_connection.cursor()
    cursor.execute("EXPLAIN " + statement, parameters)
    return "\n".join(r[0] for r in cursor.fetchall())
