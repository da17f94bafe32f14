"""Neighbours who cannot hurt each other: one reader's statement that runs long is cut off with
QUERY_TOO_EXPENSIVE, holds no slot and no connection, and the others go on being answered."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import text

from pipelines.core.db import get_engine
from tests.helpers import api_processes, make_key


def test_a_statement_past_the_time_limit_is_422_and_holds_nothing(admin_key):
    reader = make_key(["read"])
    held, release = threading.Event(), threading.Event()

    def hold_the_tables() -> None:
        """What a long statement looks like from outside: the tables busy for as long as it runs."""
        with get_engine().connect() as conn:
            conn.execute(text("LOCK TABLE observations, jobs IN ACCESS EXCLUSIVE MODE"))
            held.set()
            release.wait(60)
            conn.rollback()

    with api_processes(1, INGOT_API_STATEMENT_TIMEOUT_MS="300", INGOT_API_CONCURRENCY="2") as (url,), \
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": reader}) as http:
        holder = threading.Thread(target=hold_the_tables)
        holder.start()
        try:
            assert held.wait(10)
            # More readers than the API lets in at once, on a sync route and on an async one.
            requests = [("POST", "/api/v1/data/query", {"sort": {"field": "value", "order": "desc"}})] * 3 + \
                       [("GET", "/api/v1/jobs/job_missing", None)] * 3
            with ThreadPoolExecutor(len(requests)) as pool:
                answers = list(pool.map(lambda r: http.request(r[0], r[1], json=r[2]), requests))
            for answer in answers:
                assert answer.status_code == 422, answer.text
                error = answer.json()["error"]
                assert error["code"] == "QUERY_TOO_EXPENSIVE" and "300 ms" in error["message"]
            assert http.get("/api/v1/health").status_code == 200
        finally:
            release.set()
            holder.join(30)
        # Nothing stayed stuck: every slot and connection came back.
        for _ in range(4):
            assert http.post("/api/v1/data/query", json={}).status_code == 200
            assert http.get("/api/v1/jobs/job_missing").status_code == 404


def _postgres_processes():
    """The session's embedded PostgreSQL: its postmaster and every backend (None when the tests were
    given a server of their own)."""
    import os
    from pathlib import Path

    import psutil

    pidfile = Path(os.environ["INGOT_HOME"]) / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return None
    postmaster = psutil.Process(int(pidfile.read_text().split()[0]))
    return [postmaster, *postmaster.children(recursive=True)]


def test_a_frozen_database_gets_every_request_answered_in_time_and_nothing_stuck_after(admin_key):
    import signal
    import time

    import pytest

    from tests.helpers import wait_for

    if _postgres_processes() is None:
        pytest.skip("the tests were given a PostgreSQL of their own: it is not theirs to freeze")
    paths = ["/api/v1/jobs", "/api/v1/status", "/api/v1/sources", "/api/v1/scenarios", "/api/v1/jobs/job_missing",
             "/api/v1/webhooks"] * 2
    with api_processes(1, INGOT_API_REQUEST_TIMEOUT_SECONDS="3", INGOT_API_QUEUE_SECONDS="2") as (url,), \
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": admin_key}) as http:
        assert all(http.get(p).status_code in (200, 404) for p in paths)  # warm: keys checked, pools filled
        frozen = _postgres_processes()
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        try:
            def timed(path: str) -> tuple[int, float, str]:
                began = time.monotonic()
                answer = http.get(path)
                return answer.status_code, time.monotonic() - began, answer.headers.get("retry-after", "")

            with ThreadPoolExecutor(len(paths)) as pool:
                answers = list(pool.map(timed, paths))
            assert http.get("/api/v1/health").status_code == 200
        finally:
            for process in frozen:
                process.send_signal(signal.SIGCONT)
        for (status, seconds, retry_after), path in zip(answers, paths, strict=True):
            assert status == 503 and retry_after, (path, status)
            assert seconds < 3 + 2, (path, seconds)  # the deadline, and some room for a busy machine
        # Thawed: everything answers again, and no session of the API is left in a transaction.
        wait_for(lambda: all(http.get(p).status_code in (200, 404) for p in paths), timeout=30,
                 message="the API to answer after the thaw")

        def stuck() -> int:
            with get_engine().connect() as conn:
                return conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar_one()

        wait_for(lambda: stuck() == 0, timeout=20, message="the abandoned sessions to be closed")


def test_an_abandoned_session_refuses_further_work_and_is_closed():
    import pytest

    from pipelines.core.db import Abandoned, abandon, new_session
    from tests.helpers import wait_for

    session = new_session(limited=True)
    backend = session.execute(text("SELECT pg_backend_pid()")).scalar_one()  # a transaction is open
    abandon(session)
    with pytest.raises(Abandoned):
        session.execute(text("SELECT 1"))
    with pytest.raises(Abandoned):
        session.commit()

    def state() -> str:
        with get_engine().connect() as conn:
            return conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": backend}).scalar_one()

    wait_for(lambda: state() == "idle", timeout=10, message="the abandoned session's transaction to end")
