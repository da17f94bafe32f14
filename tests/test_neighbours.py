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
