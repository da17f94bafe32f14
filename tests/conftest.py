"""Real services for every test: PostgreSQL and Redis (embedded unless INGOT_TEST_*_URL is set).

They start in pytest_configure, before any test module imports the project, so every module and
every worker process the tests start sees the same INGOT_* environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from tests.helpers import WorkerProcess, broker, free_port, make_key, with_database

_state: dict = {}  # what pytest_configure started, for pytest_unconfigure and the fixtures below
# Tests that use these fixtures start worker processes: `make test-fast` leaves them out.
_WORKER_FIXTURES = {"worker", "start_worker"}


def _test_database(base_url: str) -> str:
    """A fresh database on BASE_URL's server, named for this run."""
    name = f"ingot_test_{secrets.token_hex(4)}"
    libpq = base_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _state["drop_database"] = (libpq, name)
    return with_database(base_url, name).replace("postgresql://", "postgresql+psycopg://", 1)


def _controller(config) -> bool:
    """Under pytest-xdist (`make test` runs two), the process that hands tests to the others: it runs
    none, so it starts no servers; each worker process has its own PostgreSQL, Redis and folders."""
    return config.pluginmanager.hasplugin("dsession") and not hasattr(config, "workerinput")


def pytest_configure(config) -> None:
    if _controller(config):
        return
    # The session's folder holds sources.toml and the data beside INGOT_HOME, as a project does:
    # file sources may not read under INGOT_HOME.
    work = Path(tempfile.mkdtemp(prefix="ingot-test-"))
    home = work / "home"
    home.mkdir(mode=0o700)
    _state["work"], _state["home"] = work, home
    os.environ.update(
        INGOT_HOME=str(home),
        INGOT_SOURCES_FILE=str(work / "sources.toml"),
        INGOT_LOG_FORMAT="console",
        INGOT_LOG_LEVEL="WARNING",
        INGOT_HEARTBEAT_SECONDS="0.5",
        INGOT_HEARTBEAT_STALE_SECONDS="4",
        INGOT_REAPER_INTERVAL_SECONDS="1",
        INGOT_QUEUED_GRACE_SECONDS="3",
        INGOT_WORKER_CONCURRENCY="1",
        INGOT_IGNORE_ENV_FILE="1",
        INGOT_WEBHOOK_ALLOW_PRIVATE="true",  # the tests' receivers listen on loopback
        INGOT_WEBHOOK_RETRY_SCHEDULE="0,0.3,0.3,0.3",
        INGOT_WEBHOOK_RELAY_INTERVAL_SECONDS="0.3",
        INGOT_WEBHOOK_CLAIM_SECONDS="3",
    )
    for name in ("INGOT_DATABASE_URL", "INGOT_REDIS_URL", "INGOT_AUTH_DISABLED", "INGOT_DATA_ROOTS"):
        os.environ.pop(name, None)
    (work / "sources.toml").write_text("")

    from pipelines.core import embedded

    base = os.environ.get("INGOT_TEST_DATABASE_URL") or embedded.postgres_url(home)
    os.environ["INGOT_DATABASE_URL"] = _test_database(base)
    redis_url = os.environ.get("INGOT_TEST_REDIS_URL")
    if not redis_url:
        _state["redis"] = embedded.EmbeddedRedis(home)
        redis_url = _state["redis"].start()
    os.environ["INGOT_REDIS_URL"] = redis_url

    from pipelines.core import migrate

    migrate.upgrade()


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.worker)


def pytest_unconfigure(config) -> None:
    if "home" not in _state:  # the xdist controller: nothing was started here
        return
    from pipelines.core.db import dispose_engine

    dispose_engine()
    if "drop_database" in _state:
        libpq, name = _state["drop_database"]
        try:
            with psycopg.connect(libpq, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass
    if "redis" in _state:
        _state["redis"].stop()
    _stop_embedded_postgres(_state["home"] / "pgdata")
    if not os.environ.get("INGOT_KEEP_TEST_HOME"):
        shutil.rmtree(_state["work"], ignore_errors=True)


def _stop_embedded_postgres(pgdata: Path, timeout: float = 30) -> None:
    """Stop the session's embedded PostgreSQL before its directory goes: pgserver keeps its count of
    users inside that directory, so its own exit hook could no longer tell that the server must stop."""
    import psutil

    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text().split()[0])
    try:
        # Immediate shutdown: its data are deleted next, so the checkpoint of a fast shutdown (2 s of
        # fsync at the end of every session) would be written for nothing.
        os.kill(pid, signal.SIGQUIT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


# --- per-test state ------------------------------------------------------------------------------

TABLES = ("jobs, quarantine_sightings, quarantine, observations, source_state, api_keys, users, config_overrides, "
          "curves, curve_index, scenarios, scenario_outputs, scenario_metrics, "
          "events, webhooks, webhook_events, webhook_deliveries, webhook_attempts, retired_totals, job_queue_marks, "
          "source_files, revoked_tokens")
# Which of them hold a row, in one cheap statement: TRUNCATE costs ~45 ms for the lot even when they
# are empty, and most tests touch only a few.
_USED = text(" UNION ALL ".join(f"(SELECT '{t}' FROM {t} LIMIT 1)" for t in TABLES.split(", ")))


@pytest.fixture(autouse=True)
def clean_state():
    yield
    from psycopg.errors import DeadlockDetected
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from pipelines.core.db import get_engine

    # The shared worker may still be relaying the events of the test's last jobs: the relay's statement
    # locks webhook_events, then webhooks, the other order from TRUNCATE's, and PostgreSQL ends one of
    # the two (seen once in CI). If it ends this one, the relay's statement goes through and this one
    # is tried again.
    for attempt in range(5):
        try:
            with get_engine().begin() as conn:
                used = conn.execute(_USED).scalars().all()
                if used:  # CASCADE: an empty table that refers to one of them comes along
                    conn.execute(text(f"TRUNCATE {', '.join(used)} CASCADE"))
                # Every test meets each source for the first time: its first load takes the bulk path.
                for (table,) in conn.execute(text(
                    "SELECT quote_ident(relname) FROM pg_class WHERE relname LIKE 'observations\\_%%' "
                    "AND relkind = 'r'"
                )):
                    conn.execute(text(f"DROP TABLE {table}"))
            break
        except OperationalError as exc:
            if not isinstance(exc.orig, DeadlockDetected) or attempt == 4:
                raise
    from worker.queues import Queues

    client = broker()
    client.delete(*[q.value for q in Queues], "unacked", "unacked_index")
    from pipelines.core import cache

    cache.drop("")
    for pattern in ("ingot:ratelimit:*", "ingot:login:*"):  # every test starts with full buckets
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)


@pytest.fixture(scope="session")
def session_home() -> Path:
    """INGOT_HOME of this test session (for fixtures wider than one test)."""
    return _state["home"]


@pytest.fixture(scope="session")
def session_work() -> Path:
    """The folder of this session's sources.toml and its data (beside INGOT_HOME, not in it)."""
    return _state["work"]


@pytest.fixture
def embedded_redis():
    """The session's embedded Redis server (skips when the tests were given a Redis of their own)."""
    if "redis" not in _state:
        pytest.skip("INGOT_TEST_REDIS_URL is set: the tests do not own that Redis")
    return _state["redis"]


@pytest.fixture
def configure(monkeypatch):
    """Set INGOT_* settings for one test: through the environment, so every reader in this process
    sees them, and undone afterwards. `configure(max_exports_per_key=2)`."""
    from pipelines.core.settings import get_settings

    class Configure:
        def __call__(self, **values) -> None:
            for name, value in values.items():
                monkeypatch.setenv(f"INGOT_{name.upper()}", str(value))
            get_settings.cache_clear()

        def undo(self) -> None:
            monkeypatch.undo()
            get_settings.cache_clear()

    configure = Configure()
    yield configure
    configure.undo()


@pytest.fixture
def home(session_home) -> Path:
    return session_home


@pytest.fixture
def write_sources(session_work):
    """Write the sources.toml every process reads (INGOT_SOURCES_FILE)."""

    def write(text: str) -> Path:
        path = session_work / "sources.toml"
        path.write_text(text)
        return path

    yield write
    (session_work / "sources.toml").write_text("")


@pytest.fixture
def data_dir(session_work) -> Path:
    path = session_work / "data"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    return path


@pytest.fixture
def session():
    from pipelines.core.db import new_session

    s = new_session()
    yield s
    s.rollback()
    s.close()


@pytest.fixture
def admin_key() -> str:
    return make_key(["admin"])


# --- real processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _module_worker():
    held: dict[str, WorkerProcess | None] = {"worker": None}
    yield held
    if held["worker"] is not None:
        held["worker"].discard()


@pytest.fixture
def start_worker(_module_worker):
    started: list[WorkerProcess] = []

    def start(**kwargs) -> WorkerProcess:
        if _module_worker["worker"] is not None:  # a worker of the test's own must not share the queues
            _module_worker["worker"].discard()
            _module_worker["worker"] = None
        worker = WorkerProcess(**kwargs).wait_ready()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.discard()


@pytest.fixture
def worker(start_worker) -> WorkerProcess:
    return start_worker()


@pytest.fixture
def no_worker(_module_worker) -> None:
    """No worker takes this test's jobs: the module's shared worker, if one runs, is stopped."""
    if _module_worker["worker"] is not None:
        _module_worker["worker"].discard()
        _module_worker["worker"] = None


@pytest.fixture
def shared_worker(_module_worker) -> WorkerProcess:
    """One worker for the tests of a module that asks for it (`worker = shared` there), started once
    rather than per test, and started again if a test killed it. For modules whose tests use a
    worker as it comes: no settings of its own, nothing that outlives a test."""
    worker = _module_worker["worker"]
    if worker is None or worker.process.poll() is not None:
        if worker is not None:
            worker.discard()
        worker = _module_worker["worker"] = WorkerProcess().wait_ready()
    return worker


@pytest.fixture(scope="session")
def api_url() -> str:
    """The real API over real HTTP: uvicorn in a thread of the test process."""
    import uvicorn

    from api.main import SERVER_OPTIONS, create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning",
                                           **SERVER_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(api_url, admin_key):
    from cli.client import Client

    with Client(api_url, admin_key) as c:
        yield c


@pytest.fixture
def api():
    """A scriptable HTTP server on loopback (tests.fakeapi)."""
    from tests.fakeapi import FakeApi

    server = FakeApi()
    yield server
    server.close()
