"""Engine and sessions. The request or the task owns the transaction, never a service."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

import psycopg
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from sqlalchemy import create_engine, event, make_url
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, CursorResult, Engine, Result
from sqlalchemy.exc import DisconnectionError, IllegalStateChangeError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import JSON

from pipelines.core import embedded, pgarrays
from pipelines.core.settings import get_settings

log = logging.getLogger(__name__)

pgarrays.register(psycopg.adapters)  # before any connection: every one made here can send them

def sqlalchemy_url(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


# A peer that vanishes without closing (a host cut off, a frozen process, a cable pulled) is noticed
# within about 30 s on both ends: libpq's keepalives and TCP user timeout on ours, the same settings
# asked of the server for its end. Without them the server keeps a vanished worker's transaction, and
# the locks it holds, open for the kernel's default two hours, and the job it was running cannot be
# taken over. (No effect over Unix sockets.)
DEAD_PEER = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 "
               "-c tcp_user_timeout=30000",
}


def dead_peer_args(url: str, statement_timeout_ms: int | None = None) -> dict:
    """DEAD_PEER, keeping any `options` the URL already gives the server (and asking the server for
    nothing when INGOT_DB_SERVER_KEEPALIVES is off); with STATEMENT_TIMEOUT_MS, every statement on
    the connection is also limited to that long."""
    args: dict[str, object] = {k: v for k, v in DEAD_PEER.items() if k != "options"}
    own = make_url(url).query.get("options")
    options = [own if isinstance(own, str) else " ".join(own or ())]
    if get_settings().db_server_keepalives:
        options.append(str(DEAD_PEER["options"]))
    if statement_timeout_ms:
        options.append(f"-c statement_timeout={int(statement_timeout_ms)}")
    if any(options):
        args["options"] = " ".join(o for o in options if o)
    return args


@lru_cache
def get_engine(limited: bool = False) -> Engine:
    """The process's engine; LIMITED, the one whose every statement is cut off after
    INGOT_API_STATEMENT_TIMEOUT_MS (what the API's requests use: see `new_session`)."""
    settings = get_settings()
    url = sqlalchemy_url(embedded.database_url(settings))
    size = settings.db_pool_size
    timeout = settings.api_statement_timeout_ms if limited else None
    # pool_timeout: a request that cannot get a connection soon is answered 503, not left hanging.
    engine = create_engine(url, pool_size=size, max_overflow=size, pool_timeout=10, pool_recycle=1800,
                           connect_args=dead_peer_args(url, timeout))
    event.listen(engine, "checkout", _still_open)
    return engine


def _still_open(dbapi_connection: psycopg.Connection, record: object, proxy: object) -> None:
    """A pooled connection's check before it is handed out, in place of a round trip (`pool_pre_ping`
    cost one a checkout, 7% of a scenario run's time). An idle connection has nothing to read: the
    server speaks to it only when asked. One it can read from has been closed by the server (a
    restart: the termination notice and end of stream) or by the kernel (the server's process died),
    and is replaced; SQLAlchemy makes a new connection. What this cannot see, a server frozen or cut
    off, a ping could not have answered either: both wait on `DEAD_PEER`."""
    if dbapi_connection.closed:
        raise DisconnectionError("the connection was closed")
    poll = select.poll()  # not select(): a worker may hold descriptors past its 1024
    poll.register(dbapi_connection.fileno(), select.POLLIN)
    if poll.poll(0):  # an ended stream, or a notice in place of one: spent either way
        raise DisconnectionError("the server closed the connection while it was idle")


@lru_cache
def _sessionmaker(limited: bool = False) -> sessionmaker[Session]:
    return sessionmaker(get_engine(limited), expire_on_commit=False)


def dispose_engine() -> None:
    """Forget the engines (a forked worker process must not share its parent's connections)."""
    if get_engine.cache_info().currsize:
        for limited in (False, True):
            get_engine(limited).dispose(close=False)
    get_engine.cache_clear()
    _sessionmaker.cache_clear()


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: committed on success, rolled back on error."""
    session = _sessionmaker()()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection on which each statement is its own transaction: a single guarded UPDATE, or a read,
    in one round trip (no BEGIN and COMMIT around it)."""
    with get_engine().connect() as connection:
        yield connection.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def transaction(connection: Connection) -> Iterator[Connection]:
    """One transaction on CONNECTION, which is in autocommit (from `autocommit`): BEGIN first, COMMIT
    at the end, ROLLBACK on an error, by psycopg under it (SQLAlchemy, told the connection is in
    autocommit, adds none of its own). A lost connection raises SQLAlchemy's DBAPIError from a
    statement inside, or psycopg's OperationalError from the COMMIT."""
    with driver(connection).transaction():
        yield connection


def new_session(limited: bool = False) -> Session:
    """A session; LIMITED, on the engine whose statements are cut off after
    INGOT_API_STATEMENT_TIMEOUT_MS (a request's)."""
    return _sessionmaker(limited)()


def on_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run CALLBACK once SESSION's transaction commits; drop it if the transaction rolls back.

    Background work is sent this way, so a task never runs for a row that was never committed.
    """
    session.info.setdefault("on_commit", []).append(callback)


class Abandoned(RuntimeError):
    """The request this session served was answered already (its deadline passed)."""


ABANDONED_CLOSE_SECONDS = 3600.0  # how long an abandoned session's thread waits for it to come free


def abandon(session: Session) -> None:
    """Give up SESSION, whose request was answered without it (its deadline passed) while a thread may
    still be inside one of its statements: from now on it refuses every statement and commit, and it
    is closed (rolled back, its connection pooled) from a thread of its own as soon as the statement
    in flight lets it (SQLAlchemy refuses to close a session in the middle of taking a connection;
    psycopg lets one call at a time into a connection)."""
    session.info["abandoned"] = True
    threading.Thread(target=_close_abandoned, args=(session,), name="ingot-abandoned-session", daemon=True).start()


def _close_abandoned(session: Session) -> None:
    deadline, pause = time.monotonic() + ABANDONED_CLOSE_SECONDS, 0.05
    while True:
        try:
            session.close()
            return
        except IllegalStateChangeError:  # the thread that used it is still taking its connection
            if time.monotonic() > deadline:
                log.error("an abandoned session could not be closed within %s s", ABANDONED_CLOSE_SECONDS)
                return
            time.sleep(pause)  # nothing to poll: the other thread gives no signal when it is done
            pause = min(pause * 2, 1.0)
        except Exception:  # the connection broke meanwhile: the pool discards it
            log.warning("could not close an abandoned session cleanly", exc_info=True)
            return


@event.listens_for(Session, "do_orm_execute")
def _refuse_if_abandoned(state) -> None:
    if state.session.info.get("abandoned"):
        raise Abandoned("this request was already answered (past its deadline): its work is not done")


@event.listens_for(Session, "before_commit")
def _no_commit_if_abandoned(session: Session) -> None:
    if session.info.get("abandoned"):
        raise Abandoned("this request was already answered (past its deadline): nothing is committed")


@event.listens_for(Session, "after_commit")
def _run_on_commit(session: Session) -> None:
    callbacks = session.info.pop("on_commit", [])
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_on_commit(session: Session) -> None:
    session.info.pop("on_commit", None)


def driver(connection: Connection) -> psycopg.Connection:
    """The psycopg connection under a SQLAlchemy one (for COPY and other psycopg-only calls)."""
    raw = connection.connection.driver_connection
    assert raw is not None, "a checked-out connection always has its driver connection"
    return raw


def affected(result: Result) -> int:
    """How many rows an UPDATE or DELETE touched."""
    return cast(CursorResult, result).rowcount


class Prepared:
    """A SQLAlchemy statement compiled once for psycopg, for the few statements every job runs (its
    claim and its end): executed on the connection's driver, with none of SQLAlchemy's work per
    execution (its cache key, its parameters, its rows: a fifth of a small scenario run's CPU, measured).
    Its rows are named tuples; its JSON parameters are sent as JSONB, as SQLAlchemy would."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=PGDialect_psycopg()))
        if compiled.post_compile_params:
            raise ValueError("a prepared statement takes no list rewritten into it at execution")
        if any(bind.callable is not None for bind in compiled.bind_names):
            raise ValueError("a prepared statement takes no value computed at execution")
        self.sql = compiled.string
        # The values the statement carries (an enum's own value); those without one come with each execution.
        self.defaults = {name: getattr(bind.effective_value, "value", bind.effective_value)
                         for bind, name in compiled.bind_names.items() if not bind.required}
        self.json = frozenset(name for bind, name in compiled.bind_names.items() if isinstance(bind.type, JSON))

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> psycopg.Cursor[Any]:
        values = {**self.defaults, **params}
        for name in self.json:
            if values[name] is not None:
                values[name] = Jsonb(values[name])
        return driver(connection).cursor(row_factory=namedtuple_row).execute(self.sql, values)
